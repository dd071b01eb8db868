"""``fingerprint`` and ``show`` on real checkpoints and a real server, and their user errors."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inversion_monitor.app.cli import main
from inversion_monitor.metrics.stats import inversion_stats
from inversion_monitor.probe.gradients import logit_gradient_norms
from inversion_monitor.toy.corpus import reasoning_corpus
from inversion_monitor.toy.models import tiny_causal_lm
from inversion_monitor.toy.tokenizer import char_tokenizer
from tests.server_support import free_port, open_run, push, record, running, stub_for


def _save(directory: Path, seed: int) -> Path:
    tiny_causal_lm("llama", seed=seed).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return _save(root / "base", 0), _save(root / "other", 1)


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "texts.txt"
    path.write_text("\n".join(reasoning_corpus(6, seed=3)) + "\n")
    return path


def _reference_rho(
    directory: Path, texts: list[str], max_tokens: int, layers: list[int] | None = None
) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tok = char_tokenizer()
    entropy, score, left = [], [], max_tokens
    for text in texts:
        ids = tok(text)["input_ids"]
        n = min(len(ids) - 1, left)
        if n <= 0:
            continue
        positions = torch.tensor([[0, t] for t in range(n)])
        result = logit_gradient_norms(
            model, torch.tensor([ids]), positions=positions, layers=layers
        )
        entropy.append(result.entropy)
        score.append(result.score)
        left -= n
    return inversion_stats(torch.cat(entropy), torch.cat(score)).spearman


def test_fingerprint_matches_the_core_api(checkpoints, texts, capsys) -> None:
    base, _ = checkpoints
    assert (
        main(
            [
                "fingerprint",
                "--model",
                str(base),
                "--data",
                str(texts),
                "--max-tokens",
                "150",
                "--json",
            ]
        )
        == 0
    )
    payload = json.loads(capsys.readouterr().out)
    stats = payload["checkpoints"][str(base)]
    assert stats["n"] == 150
    expected = _reference_rho(base, texts.read_text().splitlines(), 150)
    assert stats["spearman"] == pytest.approx(expected, abs=1e-6)
    low, high = stats["spearman_ci"]
    assert low < stats["spearman"] < high
    assert {(c["layer"], c["projection"]) for c in stats["components"]} == {(1, p) for p in "qkvo"}


def test_fingerprint_compare_and_html(checkpoints, texts, tmp_path, capsys) -> None:
    base, other = checkpoints
    out = tmp_path / "fp.html"
    argv = ["fingerprint", "--model", str(base), "--compare", str(other), "--data", str(texts)]
    argv += ["--max-tokens", "80", "--layers", "0", "-1", "--per-token-type", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"{base}: 80 tokens" in text and f"{other}: 80 tokens" in text
    assert text.count("layer  0 q") == 2 and "per token type" in text
    assert "data:image/png;base64," in out.read_text()
    for directory in (base, other):
        lines = texts.read_text().splitlines()
        rho = f"{_reference_rho(directory, lines, 80, layers=[0, -1]):+.3f}"
        assert f"{directory}: 80 tokens" in text and f"spearman {rho}" in text


def test_fingerprint_prompt_completion_measures_only_completions(
    checkpoints, tmp_path, capsys
) -> None:
    base, _ = checkpoints
    data = tmp_path / "pc.jsonl"
    rows = [
        {"prompt": "Q: 12+30=?", "completion": " A: 42"},
        {"prompt": "Q: 7*6=?", "completion": " A: 42"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["fingerprint", "--model", str(base), "--data", str(data), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["checkpoints"][str(base)]
    assert stats["n"] == 2 * len(" A: 42")


# ---------------------------------------------------------------- errors a user can hit


def _fails(argv: list[str], capsys) -> str:
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_checkpoint_missing_files(checkpoints, texts, tmp_path, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints[0], broken)
    (broken / "model.safetensors").unlink()
    message = _fails(["fingerprint", "--model", str(broken), "--data", str(texts)], capsys)
    assert "lacks weights" in message and "save_pretrained" in message
    message = _fails(
        ["fingerprint", "--model", str(tmp_path / "nope"), "--data", str(texts)], capsys
    )
    assert "does not exist" in message


def test_empty_data_file(checkpoints, tmp_path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    message = _fails(["fingerprint", "--model", str(checkpoints[0]), "--data", str(empty)], capsys)
    assert "is empty" in message


def test_model_type_without_adapter(tmp_path, texts, capsys) -> None:
    from transformers import BertConfig, BertLMHeadModel

    directory = tmp_path / "bert"
    config = BertConfig(
        vocab_size=104,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        is_decoder=True,
    )
    BertLMHeadModel(config).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    capsys.readouterr()  # save_pretrained's progress bar
    message = _fails(["fingerprint", "--model", str(directory), "--data", str(texts)], capsys)
    assert "cannot probe the checkpoint's 'bert' model" in message
    assert "no architecture adapter for model_type bert" in message
    assert "register_adapter" in message


def test_layer_out_of_range(checkpoints, texts, capsys) -> None:
    argv = ["fingerprint", "--model", str(checkpoints[0]), "--data", str(texts), "--layers", "7"]
    message = _fails(argv, capsys)
    assert "layer 7 is out of range" in message and "--layers" in message


def test_debug_shows_the_traceback(tmp_path, texts) -> None:
    from inversion_monitor.app.errors import UserError

    with pytest.raises(UserError):
        main(["--debug", "fingerprint", "--model", str(tmp_path), "--data", str(texts)])


def test_no_server_at_endpoint(capsys) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    message = _fails(["show", "r", "--endpoint", endpoint, "--timeout", "2"], capsys)
    assert f"no monitor server answers at {endpoint}" in message and "--endpoint" in message


def test_show_a_run(tmp_path, capsys) -> None:
    with running(tmp_path) as server, stub_for(server) as stub:
        open_run(stub, "run1", world_size=1)
        push(stub, *(record("run1", i, spearman=-0.1 * i) for i in range(1, 4)))
        assert main(["show", "run1", "--endpoint", server.grpc_target]) == 0
        text = capsys.readouterr().out
        assert "(run1)" in text
        assert "-0.300" in text and "alerts:" in text
        message = _fails(["show", "missing", "--endpoint", server.grpc_target], capsys)
        assert "has no run 'missing'" in message


def test_port_in_use(tmp_path) -> None:
    exe = shutil.which("inversion-monitor", path=str(Path(sys.executable).parent))
    assert exe is not None
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                exe,
                "serve",
                "--grpc-address",
                f"127.0.0.1:{port}",
                "--http-address",
                "off",
                "--db",
                str(tmp_path / "m.db"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # gRPC's C core logs its own line first
    assert last == (
        f"inversion-monitor serve: cannot start: address 127.0.0.1:{port} is already in use: "
        "stop the process using it, or pass another address (--grpc-address / --http-address; "
        "port 0 picks a free one)"
    )


def test_demo_with_lightning(tmp_path) -> None:
    exe = shutil.which("inversion-monitor", path=str(Path(sys.executable).parent))
    assert exe is not None
    result = subprocess.run(
        [exe, "demo", "--framework", "lightning", "--steps", "4", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert ", completed, 4 records stored" in result.stdout
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()
