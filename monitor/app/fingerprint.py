"""``inversion-monitor fingerprint``: the inversion measurement on a saved checkpoint.

Reads texts (``.txt``: one per non-empty line; ``.jsonl``: a ``text`` field,
or ``prompt``/``completion`` where only completion tokens are measured), runs
the core probe (:func:`~inversion_monitor.probe.gradients.logit_gradient_norms`) on
each, and reports Spearman and Pearson with confidence intervals overall, per
layer and projection, and over per-token-type averages.

>>> import json, tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "d.jsonl"
>>> _ = path.write_text(json.dumps({"prompt": "Q: 1+1=", "completion": "2"}) + "\\n")
>>> read_examples(path)
[Example(prompt='Q: 1+1=', completion='2')]
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inversion_monitor.app.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Example:
    """One text to measure: ``prompt`` is context only, ``completion`` is measured.

    >>> Example("", "Q: 2+2=4").completion
    'Q: 2+2=4'
    """

    prompt: str
    completion: str


def read_examples(path: Path) -> list[Example]:
    """The examples of a ``.txt`` or ``.jsonl`` file (see the module docstring)."""
    if not path.is_file():
        raise UserError(f"data file {path} does not exist: pass an existing .txt or .jsonl file")
    if path.suffix not in (".txt", ".jsonl"):
        raise UserError(
            f"data file {path} has suffix {path.suffix!r}: use .txt (one text per line) "
            "or .jsonl (a 'text' field, or 'prompt' and 'completion')"
        )
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"data file {path} is empty: give it at least one non-empty line of text")
    if path.suffix == ".txt":
        return [Example("", line) for line in lines]
    examples = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path} line {number} is not JSON ({exc.msg}): fix that line"
            ) from None
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            examples.append(Example("", row["text"]))
        elif (
            isinstance(row, dict)
            and isinstance(row.get("prompt"), str)
            and isinstance(row.get("completion"), str)
        ):
            examples.append(Example(row["prompt"], row["completion"]))
        else:
            raise UserError(
                f"{path} line {number} has neither a 'text' string nor 'prompt' and "
                "'completion' strings: give each line one of those"
            )
    return examples


def load_checkpoint(directory: Path, device: str) -> tuple[nn.Module, Any]:
    """The causal LM and tokenizer saved in ``directory`` (local files only)."""
    if not directory.is_dir():
        raise UserError(
            f"checkpoint directory {directory} does not exist: pass a directory written by "
            "save_pretrained"
        )
    names = {p.name for p in directory.iterdir()}
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not names & set(WEIGHT_FILES):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if not names & set(TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json or tokenizer_config.json)")
    if missing:
        raise UserError(
            f"checkpoint directory {directory} lacks {', '.join(missing)}: save the model "
            "with model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR)"
        )
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inversion_monitor.probe.architectures import resolve_model

    transformers.logging.set_verbosity_error()  # our own progress bar and errors only
    transformers.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"cannot load the checkpoint in {directory} ({first}): check that it was saved "
            "with save_pretrained by a compatible transformers version"
        ) from None
    try:
        resolve_model(model)
    except NotImplementedError as exc:  # the refusal names its own reason and fix
        model_type = getattr(model.config, "model_type", type(model).__name__)
        raise UserError(f"cannot probe the checkpoint's {model_type!r} model: {exc}") from None
    return model.to(device).eval(), tokenizer


def encode(tokenizer: Any, example: Example, max_length: int) -> tuple[list[int], int]:
    """Token ids and the index of the first measured target token."""
    prompt_ids: list[int] = tokenizer(example.prompt)["input_ids"] if example.prompt else []
    if prompt_ids:
        rest = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + list(rest)
        first = len(prompt_ids)
    else:
        ids = list(tokenizer(example.completion)["input_ids"])
        first = 1
    return ids[:max_length], max(first, 1)


@dataclass
class Measurement:
    """Everything measured on one checkpoint, concatenated over the examples."""

    entropy: torch.Tensor
    score: torch.Tensor
    tokens: torch.Tensor
    norms: dict[tuple[int, str], torch.Tensor]


def measure(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    layers: Sequence[int],
    max_tokens: int,
    max_length: int = 1024,
    desc: str = "fingerprint",
) -> Measurement:
    """Probe each example's measured tokens until ``max_tokens`` targets."""
    import torch
    from tqdm.auto import tqdm

    from inversion_monitor.probe.gradients import logit_gradient_norms

    device = next(model.parameters()).device
    parts: list[Any] = []
    total = 0
    with tqdm(total=max_tokens, desc=desc, unit="tok", leave=False) as bar:
        for example in examples:
            if total >= max_tokens:
                break
            ids, first = encode(tokenizer, example, max_length)
            # target t predicts ids[t + 1]; measure targets inside the completion
            ts = list(range(first - 1, len(ids) - 1))[: max_tokens - total]
            if not ts:
                continue
            positions = torch.tensor([[0, t] for t in ts], dtype=torch.long, device=device)
            result = logit_gradient_norms(
                model,
                torch.tensor([ids], dtype=torch.long, device=device),
                positions=positions,
                layers=list(layers),
            )
            parts.append(result)
            total += len(ts)
            bar.update(len(ts))
    if total < 4:
        raise UserError(
            f"only {total} measurable tokens in the data: give longer texts or more of them "
            "(at least 4 tokens)"
        )
    keys = list(parts[0].norms)
    return Measurement(
        entropy=torch.cat([p.entropy.cpu() for p in parts]),
        score=torch.cat([p.score.cpu() for p in parts]),
        tokens=torch.cat([p.tokens.cpu() for p in parts]),
        norms={k: torch.cat([p.norms[k].cpu() for p in parts]) for k in keys},
    )


def _corr(x: Any, y: Any) -> dict[str, Any]:
    from inversion_monitor.metrics.correlation import fisher_ci, pearson, spearman

    n = int(x.numel())
    out: dict[str, Any] = {"n": n}
    for name, fn in (("spearman", spearman), ("pearson", pearson)):
        value = float(fn(x, y))
        out[name] = _clean(value)
        out[f"{name}_ci"] = [_clean(v) for v in fisher_ci(value, n, method=name)]  # type: ignore[arg-type]
    return out


def _clean(value: float) -> float | None:
    return value if math.isfinite(value) else None


def fingerprint_stats(m: Measurement, *, per_token_type: bool) -> dict[str, Any]:
    """JSON-ready statistics of one measurement."""
    import warnings

    from inversion_monitor.metrics.stats import inversion_stats

    stats = inversion_stats(
        m.entropy,
        m.score,
        per_token_type=per_token_type,
        tokens=m.tokens if per_token_type else None,
    )
    out: dict[str, Any] = {
        "n": stats.n,
        "spearman": _clean(stats.spearman),
        "spearman_ci": [_clean(v) for v in stats.spearman_ci],
        "pearson": _clean(stats.pearson),
        "pearson_ci": [_clean(v) for v in stats.pearson_ci],
        "entropy_mean": _clean(stats.entropy_mean),
        "score_mean": _clean(stats.score_mean),
        "insufficient": stats.reason,
    }
    if per_token_type:
        out["per_token_type"] = {
            "spearman": _clean(stats.spearman_per_token_type or math.nan),
            "token_types": stats.n_token_types,
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["components"] = [
            {"layer": layer, "projection": projection, **_corr(m.entropy, values)}
            for (layer, projection), values in sorted(m.norms.items())
        ]
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _ci(pair: Sequence[float | None]) -> str:
    return f"[{_fmt(pair[0])}, {_fmt(pair[1])}]"


def format_stats(name: str, stats: dict[str, Any]) -> str:
    """The terminal report of one checkpoint."""
    lines = [
        f"{name}: {stats['n']} tokens, entropy mean {stats['entropy_mean']:.3f}",
        f"  overall   spearman {_fmt(stats['spearman'])} {_ci(stats['spearman_ci'])}"
        f"  pearson {_fmt(stats['pearson'])} {_ci(stats['pearson_ci'])}",
    ]
    if "per_token_type" in stats:
        per = stats["per_token_type"]
        lines.append(
            f"  per token type ({per['token_types']} types)  spearman {_fmt(per['spearman'])}"
        )
    for c in stats["components"]:
        lines.append(
            f"  layer {c['layer']:>2} {c['projection']}  spearman {_fmt(c['spearman'])} "
            f"{_ci(c['spearman_ci'])}  pearson {_fmt(c['pearson'])} {_ci(c['pearson_ci'])}"
        )
    return "\n".join(lines)


def scatter_html(title: str, results: dict[str, tuple[Measurement, dict[str, Any]]]) -> str:
    """A self-contained HTML page: each checkpoint's table and entropy/strength scatter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from inversion_monitor.app.report import _png, html_report

    images = {}
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (name, (m, stats)) in zip(axes[0], results.items(), strict=True):
        ax.scatter(m.entropy.numpy(), m.score.numpy(), s=6, alpha=0.5)
        ax.set(
            title=f"{name}: rho {_fmt(stats['spearman'])}",
            xlabel="entropy (nats)",
            ylabel="logit-gradient strength",
        )
    images["entropy vs gradient strength"] = _png(fig)
    plt.close(fig)
    text = "\n\n".join(format_stats(name, stats) for name, (_, stats) in results.items())
    return html_report(title, text, images)


def run_fingerprint(
    *,
    model: Path,
    data: Path,
    compare: Path | None = None,
    layers: Sequence[int] = (-1,),
    per_token_type: bool = False,
    max_tokens: int = 4096,
    out: Path | None = None,
    as_json: bool = False,
) -> int:
    """The ``fingerprint`` command; returns the exit code."""
    import torch

    from inversion_monitor.probe.architectures import resolve_model

    if max_tokens < 4:
        raise UserError(f"--max-tokens must be at least 4, got {max_tokens}: raise it")
    examples = read_examples(data)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, tuple[Measurement, dict[str, Any]]] = {}
    for directory in [model, *([compare] if compare is not None else [])]:
        net, tokenizer = load_checkpoint(directory, device)
        resolved = resolve_model(net)
        for layer in layers:
            try:
                resolved.layer_index(layer)
            except ValueError as exc:
                raise UserError(f"{exc}: fix --layers") from None
        m = measure(
            net, tokenizer, examples, layers=layers, max_tokens=max_tokens, desc=directory.name
        )
        results[str(directory)] = (m, fingerprint_stats(m, per_token_type=per_token_type))
        del net
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(scatter_html("inversion-monitor fingerprint", results), encoding="utf-8")
    if as_json:
        payload = {
            "device": device,
            "data": str(data),
            "checkpoints": {name: stats for name, (_, stats) in results.items()},
        }
        print(json.dumps(payload, indent=2))
    else:
        print("\n\n".join(format_stats(name, stats) for name, (_, stats) in results.items()))
        if out is not None:
            print(f"report: {out.resolve()}")
    return 0
