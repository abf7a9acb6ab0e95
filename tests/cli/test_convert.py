"""``tvq convert``: a checkpoint (a pickled task_vectors-style module, a head) rewritten as safetensors, and
``tvq quantize --pretrained-prefix / --finetuned-prefix`` on the result."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tvq_lightning.models.heads import ClassificationHead
from tvq_lightning.store import TaskVectorStore
from tvq_lightning.store.checkpoints import load_state_dict

# a small release in task_vectors' layout (torch.nn only, so it is quick to write): src.modeling's classes
MODELING = '''
import torch


class ImageEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
        self.cache_dir = "/cache"


class ClassificationHead(torch.nn.Linear):
    def __init__(self, normalize, weights):
        super().__init__(weights.shape[1], weights.shape[0])
        self.normalize = normalize
        self.weight = torch.nn.Parameter(weights.clone())
'''

MAKE = '''
import sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from src.modeling import ClassificationHead, ImageEncoder

out = Path(sys.argv[1])
torch.manual_seed(0)
enc = ImageEncoder()
torch.save(enc, out / "zeroshot.pt")
save_file({k: v.detach().clone() for k, v in enc.state_dict().items()}, out / "zeroshot.ref.safetensors")
with torch.no_grad():
    for p in enc.parameters():
        p.add_(0.1)
torch.save(enc, out / "finetuned.pt")
head = ClassificationHead(True, torch.randn(3, 4))
torch.save(head, out / "head.pt")
save_file({k: v.detach().clone() for k, v in head.state_dict().items()}, out / "head.ref.safetensors")
'''


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("convert")
    (root / "code" / "src").mkdir(parents=True)
    (root / "code" / "src" / "__init__.py").write_text("")
    (root / "code" / "src" / "modeling.py").write_text(MODELING)
    out = root / "files"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(root / "code")}
    res = subprocess.run([sys.executable, "-c", MAKE, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _one_line_error(res, *needles: str) -> str:
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert res.rc == 2 and len(lines) == 1 and lines[0].startswith("tvq: error: "), (res.rc, res.err)
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_convert_pickled_module(tvq, release, tmp_path):
    out = tmp_path / "zeroshot.safetensors"
    _one_line_error(tvq("convert", release / "zeroshot.pt", out), "zeroshot.pt", "--allow-pickle", "allow-list")
    assert not out.exists()
    res = tvq("convert", release / "zeroshot.pt", out, "--allow-pickle")
    assert res.rc == 0, res.err
    assert "wrote 6 tensors" in res.out and str(out) in res.out
    ref = load_file(release / "zeroshot.ref.safetensors")
    got = load_file(out)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    _one_line_error(tvq("convert", release / "zeroshot.pt", out, "--allow-pickle"), str(out), "--overwrite")
    res = tvq("convert", release / "zeroshot.pt", out, "--allow-pickle", "--prefix", "model.", "--overwrite")
    assert res.rc == 0, res.err
    assert sorted(load_file(out)) == ["0.bias", "0.weight", "1.bias", "1.weight", "2.bias", "2.weight"]
    assert "src" not in sys.modules


def test_convert_head(tvq, release, tmp_path):
    out = tmp_path / "SUN397.safetensors"
    res = tvq("convert", release / "head.pt", out, "--head", "--allow-pickle")
    assert res.rc == 0, res.err
    assert "3 classes x 4 features" in res.out
    head = ClassificationHead.load(out)
    ref = load_file(release / "head.ref.safetensors")
    assert torch.equal(head.weight, ref["weight"]) and torch.equal(head.bias, ref["bias"])
    _one_line_error(tvq("convert", release / "zeroshot.pt", tmp_path / "h.safetensors", "--head", "--allow-pickle"),
                    "not a classification head")
    _one_line_error(tvq("convert", release / "head.pt", tmp_path / "h.safetensors", "--head"), "--allow-pickle")
    _one_line_error(tvq("convert", release / "head.pt", tmp_path / "h.safetensors", "--head", "--trust-pickle-code"),
                    "--trust-pickle-code")
    assert not (tmp_path / "h.safetensors").exists()


def test_convert_refuses_bad_arguments(tvq, release, tmp_path):
    _one_line_error(tvq("convert", release / "zeroshot.pt", tmp_path / "out.pt", "--allow-pickle"), ".safetensors")
    _one_line_error(tvq("convert", tmp_path / "missing.pt", tmp_path / "o.safetensors"), "missing.pt", "no such file")
    st = tmp_path / "same.safetensors"
    assert tvq("convert", release / "zeroshot.pt", st, "--allow-pickle").rc == 0
    _one_line_error(tvq("convert", st, st, "--overwrite"), "same file")
    _one_line_error(tvq("convert", release / "zeroshot.pt", tmp_path / "no" / "dir.safetensors", "--allow-pickle"),
                    "no such directory")
    help_text = tvq("convert", "--help").out
    assert "--trust-pickle-code" in " ".join(help_text.split()) and "RUNS CODE FROM THE FILE" in " ".join(help_text.split())


def test_trust_pickle_code_loads_importable_classes(tvq, tmp_path):
    lin = torch.nn.Linear(2, 2)
    torch.save(lin, tmp_path / "lin.pt")
    res = tvq("convert", tmp_path / "lin.pt", tmp_path / "lin.safetensors", "--trust-pickle-code")
    assert res.rc == 0, res.err
    assert torch.equal(load_state_dict(tmp_path / "lin.safetensors")["weight"], lin.weight.detach())


def test_quantize_with_separate_prefixes(tvq, release, tmp_path):
    """theta_0 converted without its wrapper prefix; the pickled fine-tuned module keeps ``model.``."""
    pre = tmp_path / "theta0.safetensors"
    assert tvq("convert", release / "zeroshot.pt", pre, "--allow-pickle", "--prefix", "model.").rc == 0
    argv = ["quantize", "--pretrained", pre, "--finetuned", f"cars={release / 'finetuned.pt'}", "--out", tmp_path / "s",
            "--allow-pickle", "--scheme", "fp32", "--quiet"]
    _one_line_error(tvq(*argv), "finetuned.pt")  # keys model.0.weight ... do not match theta_0's 0.weight ...
    res = tvq(*argv, "--finetuned-prefix", "model.")
    assert res.rc == 0, res.err
    store = TaskVectorStore(tmp_path / "s")
    assert torch.allclose(store.task_vector("cars", "0.weight"), torch.full((8, 6), 0.1), atol=1e-6)
    res = tvq("quantize", "--pretrained", release / "zeroshot.pt", "--finetuned", f"cars={release / 'finetuned.pt'}",
              "--out", tmp_path / "s2", "--allow-pickle", "--scheme", "fp32", "--quiet", "--pretrained-prefix", "model.",
              "--finetuned-prefix", "model.")
    assert res.rc == 0, res.err
    assert TaskVectorStore(tmp_path / "s2").keys == store.keys
