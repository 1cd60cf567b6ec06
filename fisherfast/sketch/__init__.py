"""FisherSketch: 16 KB signatures of a task's head-Fisher geometry, computed in
one streaming pass and mergeable across shards (docs/design.md §7)."""
from fisherfast.sketch.alignment import AlignmentResult, Marginals, alignment, coupling_stderr, marginals
from fisherfast.sketch.sketcher import FisherSketcher, sketch_features
from fisherfast.sketch.spec import SKETCH_VERSION, SketchSpec
from fisherfast.sketch.state import KINDS, SketchState
from fisherfast.sketch.distributed import all_reduce_state  # noqa: E402  (model-level parts)
from fisherfast.sketch.fullnet import FullNetworkSketcher, FullNetworkState  # noqa: E402
from fisherfast.sketch.model import sketch_model, sketch_task, sketch_tasks  # noqa: E402
from fisherfast.sketch.tasks import PromptTask, verbalizer_tasks  # noqa: E402
from fisherfast.sketch.corpus import init_distributed_from_env, read_corpus, sketch_corpus  # noqa: E402
from fisherfast.sketch.select import SourceScore, rank_sources  # noqa: E402
from fisherfast.sketch.index import SignatureIndex  # noqa: E402

__all__ = ["SketchSpec", "SKETCH_VERSION", "SketchState", "KINDS", "FisherSketcher", "sketch_features",
           "alignment", "marginals", "coupling_stderr", "AlignmentResult", "Marginals",
           "sketch_model", "sketch_task", "sketch_tasks", "PromptTask", "verbalizer_tasks", "all_reduce_state",
           "FullNetworkSketcher", "FullNetworkState", "read_corpus", "sketch_corpus", "init_distributed_from_env",
           "rank_sources", "SourceScore", "SignatureIndex"]
