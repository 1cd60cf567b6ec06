"""Text tables and the heatmap of FisherSketch alignments (docs/design.md §7),
shared by ``fisherfast align`` and ``fisherfast demo``."""
from __future__ import annotations

# One line per quantity the alignment commands print.
COLUMN_NOTES = {
    "A": "A    head-Fisher alignment ⟨F_i, F_j⟩/(‖F_i‖‖F_j‖), the cosine of the joint signatures "
         "(1: same head-gradient geometry, 0: orthogonal)",
    "S_a": "S_a  activation alignment: cosine of the activation second moments E[a aᵀ] "
           "(all that an activation-only similarity can see)",
    "S_e": "S_e  error alignment: cosine of the logit-error second moments Γ_e = E[e eᵀ], e = p − e_y "
           "(which answer tokens the tasks train)",
    "ρ": "ρ    A / (S_a·S_e): 1 when a and e are independent within each task; away from 1 they are coupled",
}
KIND_LABEL = {"joint": "A", "activation": "S_a", "error": "S_e"}


def alignment_table(result, label: str = "A") -> str:
    """Plain-text matrix of an AlignmentResult (cosines, ± standard errors when known)."""
    names = result.names
    width = max(12, *(len(n) for n in names)) + 2
    lines = [f"{label:<{width}}" + "".join(f"{n:>{width}}" for n in names)]
    for i, name in enumerate(names):
        cells = []
        for j in range(len(names)):
            cell = f"{float(result.A[i, j]):.3f}"
            if result.stderr is not None and i != j:
                cell += f"±{float(result.stderr[i, j]):.3f}"
            cells.append(f"{cell:>{width}}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)


def heatmap(result, path: str, title: str) -> None:
    """Write the alignment matrix as an annotated heatmap (format from ``path``'s extension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2, 1.0 * n + 1.5))
    image = ax.imshow(result.A.numpy(), vmin=min(0.0, float(result.A.min())), vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), result.names, rotation=45, ha="right")
    ax.set_yticks(range(n), result.names)
    for i in range(n):
        for j in range(n):
            value = float(result.A[i, j])
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="black" if value > 0.6 else "white")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
