"""The report's plots (matplotlib, PNG): decode tokens/s against expert budget per policy and
peer, TTFT against prompt length, host -> device bytes per token. One panel per model.
Rows that did not run (errors, skips) are left out; a plot with nothing to show is not written.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from bench.report import predictor_label


def _ran(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not (r["error"] or r["skipped"] or r["not_run"])]


def _main_point(rows: list[dict], model: str) -> tuple[int, int]:
    first = next(r for r in rows if r["model"] == model)
    return first["batch"], first["prompt_tokens"]


def _series_name(r: dict) -> str:
    if r["engine"] != "offload":
        name = r["policy"]
        return name + (f" @ {r['device_budget_bytes'] / 2**30:g} GiB" if r["device_budget_bytes"] else "")
    if r.get("all_experts_fit"):
        return "offloaded, all experts fit"
    name = r["policy"] + (f" ({predictor_label(r['predictor']).split(' of ')[0]})" if r.get("predictor") else "")
    name += f" @ {r['budget_spec']}" if r.get("budget_spec") else ""
    return name + (f", prefill {r['prefill']}" if r["prefill"] else "")


def _panels(models: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(7.5 * len(models), 4.5), squeeze=False)
    return plt, fig, dict(zip(models, axes[0]))


def _save(plt, fig, path: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def decode_vs_budget(rows: list[dict], path: Path, title: str) -> Path | None:
    """Offload rows at each model's main point as lines over the expert budget; peers as horizontal lines."""
    rows = _ran(rows)
    models = sorted({r["model"] for r in rows if r["engine"] == "offload" and r["decode_tokens_per_s"]})
    if not models:
        return None
    plt, fig, axes = _panels(models)
    for model, ax in axes.items():
        batch, prompt = _main_point(rows, model)
        here = [r for r in rows if (r["model"], r["batch"], r["prompt_tokens"]) == (model, batch, prompt)]
        lines = defaultdict(list)
        for r in here:
            if r["engine"] == "offload" and not r["prefill"] and r["decode_tokens_per_s"]:
                key = "all experts fit" if r.get("all_experts_fit") else r["policy"]
                lines[key].append((r["expert_budget_bytes"] / 1e9, r["decode_tokens_per_s"]))
        for name, points in sorted(lines.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=name)
        for r in here:
            if r["engine"] != "offload" and r["decode_tokens_per_s"]:
                ax.axhline(r["decode_tokens_per_s"], linestyle="--", linewidth=1, color=f"C{len(lines) % 10}",
                           label=_series_name(r))  # fmt: skip
                lines[_series_name(r)] = []  # next peer, next colour
        ax.set(xlabel="expert budget (GB)", ylabel="decode tokens/s", yscale="log", xscale="log",
               title=f"{model}, batch {batch}, prompt {prompt}")  # fmt: skip
        ax.legend(fontsize=7)
    return _save(plt, fig, path, title)


def ttft_vs_prompt(rows: list[dict], path: Path, title: str) -> Path | None:
    """Every configuration measured at two or more prompt lengths (at the model's first batch size)."""
    rows = _ran(rows)
    series = defaultdict(list)
    for r in rows:
        if r["ttft_ms"] is not None and r["batch"] == _main_point(rows, r["model"])[0]:
            series[r["model"], _series_name(r)].append((r["prompt_tokens"], r["ttft_ms"]))
    series = {k: v for k, v in series.items() if len({p for p, _ in v}) >= 2}
    if not series:
        return None
    plt, fig, axes = _panels(sorted({m for m, _ in series}))
    for (model, name), points in sorted(series.items()):
        xs, ys = zip(*sorted(points))
        axes[model].plot(xs, ys, marker="o", label=name)
    for model, ax in axes.items():
        ax.set(xlabel="prompt tokens", ylabel="TTFT (ms)", xscale="log", yscale="log", title=model)
        ax.legend(fontsize=7)
    return _save(plt, fig, path, title)


def bytes_per_token(rows: list[dict], path: Path, title: str) -> Path | None:
    """Host -> device bytes per generated token of each offloading row: decode steps alone, and
    with the prefill's loads spread over the tokens (accelerate: its per-forward copies)."""
    rows = [r for r in _ran(rows) if r["h2d_bytes_per_token"] and r["engine"] in ("offload", "hf-accelerate")]
    if not rows:
        return None
    models = sorted({r["model"] for r in rows})
    plt, fig, axes = _panels(models)
    for model, ax in axes.items():
        here = [r for r in rows if r["model"] == model]
        labels = [f"{_series_name(r)}, b{r['batch']} p{r['prompt_tokens']}" for r in here]
        ys = range(len(here))
        overall = [r["h2d_bytes_per_token"] / 1e6 for r in here]
        decode = [(r.get("decode_h2d_bytes_per_step") or 0) / r["batch"] / 1e6 if r["engine"] == "offload" else v
                  for r, v in zip(here, overall)]  # fmt: skip
        ax.barh([y - 0.2 for y in ys], decode, height=0.4, label="decode steps")
        ax.barh([y + 0.2 for y in ys], overall, height=0.4, label="prefill included")
        ax.set_yticks(list(ys), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel="host -> device MB per generated token", title=model)
        ax.legend(fontsize=7)
    return _save(plt, fig, path, title)


def write_all(report: dict, out_dir: Path, stem: str) -> list[Path]:
    title = f"{report['device']}, {report['date']}"
    made = [decode_vs_budget(report["rows"], out_dir / f"{stem}-decode-vs-budget.png", title),
            ttft_vs_prompt(report["rows"], out_dir / f"{stem}-ttft-vs-prompt.png", title),
            bytes_per_token(report["rows"], out_dir / f"{stem}-bytes-per-token.png", title)]  # fmt: skip
    return [p for p in made if p is not None]
