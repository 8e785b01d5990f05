"""Turn the comparisons logged by the parity tests into the table of docs/parity.md.

    rm -f /tmp/parity.jsonl
    PARITY_REPORT=/tmp/parity.jsonl pytest -q -m "slow or not slow" tests/test_parity_model.py tests/test_parity_prompt.py
    python tools/parity_report.py /tmp/parity.jsonl

Each stage is listed once with the largest error over both execution modes and the scale its
tolerance was computed from (tolerance = 1e-5 * max(1, max |reference|)).
"""
import json
import sys


def main(path):
    worst = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            key = r["what"]
            modes = worst.get(key, {}).get("modes", set()) | {"graph" if r["mode"] == 0 else "pynative"}
            if key not in worst or r["err"] / r["tol"] > worst[key]["err"] / worst[key]["tol"]:
                worst[key] = dict(r)
            worst[key]["modes"] = modes
    print("| stage | modes | max abs error | tolerance | error / tolerance |")
    print("|---|---|---|---|---|")
    for key, r in worst.items():
        print(f"| {key} | {', '.join(sorted(r['modes']))} | {r['err']:.2e} | {r['tol']:.2e} | {r['err'] / r['tol']:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1])
