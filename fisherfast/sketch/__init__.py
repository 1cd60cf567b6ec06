"""FisherSketch: 16 KB signatures of a task's head-Fisher geometry, computed in
one streaming pass and mergeable across shards (docs/design.md §7)."""
from fisherfast.deprecation import moved_names
from fisherfast.sketch.alignment import AlignmentResult, Marginals, alignment, coupling_stderr, marginals
from fisherfast.sketch.sketcher import FisherSketcher, sketch_features
from fisherfast.sketch.spec import SketchSpec
from fisherfast.sketch.state import SketchState
from fisherfast.sketch.distributed import all_reduce_state  # noqa: E402  (model-level parts)
from fisherfast.sketch.fullnet import FullNetworkSketcher, FullNetworkState  # noqa: E402
from fisherfast.sketch.model import sketch_model, sketch_task, sketch_tasks  # noqa: E402
from fisherfast.sketch.tasks import PromptTask, verbalizer_tasks  # noqa: E402
from fisherfast.sketch.corpus import read_corpus, sketch_corpus  # noqa: E402
from fisherfast.sketch.select import SourceScore, rank_sources  # noqa: E402
from fisherfast.sketch.index import SignatureIndex  # noqa: E402

__all__ = ["SketchSpec", "SketchState", "FisherSketcher", "sketch_features",
           "alignment", "marginals", "coupling_stderr", "AlignmentResult", "Marginals",
           "sketch_model", "sketch_task", "sketch_tasks", "PromptTask", "verbalizer_tasks", "all_reduce_state",
           "FullNetworkSketcher", "FullNetworkState", "read_corpus", "sketch_corpus",
           "rank_sources", "SourceScore", "SignatureIndex"]

# constants and helpers that left this namespace: each stays in its module
__getattr__ = moved_names(__name__, {
    "SKETCH_VERSION": ("fisherfast.sketch.spec", "SKETCH_VERSION", "use fisherfast.sketch.spec.SKETCH_VERSION"),
    "KINDS": ("fisherfast.sketch.state", "KINDS", "use fisherfast.sketch.state.KINDS"),
    "init_distributed_from_env": ("fisherfast.sketch.corpus", "init_distributed_from_env",
                                  "use fisherfast.sketch.corpus.init_distributed_from_env"),
})
