"""Fine-tuning IXC2.5 as upstream's `finetune/` recipe does. This part: the data (files, checks,
sampling, token ids / labels / image positions, training image transform)."""
from .conversation import conv2text
from .data import SAMPLING_MODES, DataArguments, FinetuneData, MicroBatch, build_micro_batch
from .errors import FinetuneDataError
from .images import image_token_count, training_canvas, training_canvas_size, training_pixel_values
from .labels import IGNORE_INDEX, mask_human_targets
from .records import DataGroup, Record, load_data
from .sampling import SequentialSampler, UpstreamMixSampler

__all__ = ["conv2text", "build_micro_batch", "DataArguments", "FinetuneData", "MicroBatch", "SAMPLING_MODES", "FinetuneDataError",
           "image_token_count", "training_canvas", "training_canvas_size", "training_pixel_values",
           "IGNORE_INDEX", "mask_human_targets", "DataGroup", "Record", "load_data", "SequentialSampler",
           "UpstreamMixSampler"]
