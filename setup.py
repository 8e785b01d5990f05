import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "requirements.txt"), encoding="utf-8") as f:
    install_requires = [line.strip() for line in f if line.strip() and not line.startswith("#")]

setup(
    name="mindxcomposer",
    version="0.1.0",
    description="InternLM-XComposer-2.5 in native MindSpore cells, with a parity suite against the PyTorch reference",
    long_description=open(os.path.join(here, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9,<3.12",
    packages=find_packages(include=["mindxcomposer", "mindxcomposer.*"]),
    package_data={"mindxcomposer": ["assets/*", "ops/csrc/*.cc", "serve/static/*"]},
    install_requires=install_requires,
    extras_require={
        # Reading the released .bin shards needs torch; the CPU build is enough.
        "convert": ["torch==2.13.0"],
        # The golden canvases depend on Pillow's resampling and FreeType: the fixtures were made with 13.0.0.
        # mxc-serve: the ASGI stack and the client it fetches http(s) images with.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27"],
        "test": ["pytest>=7", "transformers==4.33.2", "torch==2.13.0", "pillow==13.0.0",
                 # the serving tests: the server itself and the official OpenAI client against it
                 "fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27", "openai>=1.40",
                 # the chat page's test in headless chromium (Debian's chromium + chromium-driver, see .ci/run)
                 "selenium>=4.10"],
    },
    entry_points={
        "console_scripts": [
            "mxc-convert=mindxcomposer.convert_cli:main",
            "mxc-chat=mindxcomposer.cli:main",
            "mxc-serve=mindxcomposer.serve.cli:main",
            "mxc-finetune=mindxcomposer.finetune.cli:main",
        ]
    },
)
