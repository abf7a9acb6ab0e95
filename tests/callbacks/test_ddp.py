"""BitAllocation + QuantizeOnSave under 2-process CPU DDP (gloo): identical sensitivities on every
rank (all-reduced), one writer (global rank zero), the stored vector is the synchronised weights'."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tvq_lightning.quant.config import QuantSpec
from tvq_lightning.quant.qtensor import QTensor
from tvq_lightning.store import TaskVectorStore

SCRIPT = Path(__file__).with_name("_ddp_quantize_script.py")


@pytest.mark.slow
def test_ddp_one_writer_identical_sensitivities(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=SCRIPT.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["sensitivities"] == r1["sensitivities"] and r0["head"] == r1["head"]
    assert r0["allocation"] is not None and r1["allocation"] is None  # computed by the writer only
    enc0, enc1 = (torch.load(tmp_path / f"encoder{r}.pt") for r in (0, 1))
    start = torch.load(tmp_path / "start.pt")
    store = TaskVectorStore(tmp_path / "store")
    assert store.tasks == ["a"] and store.layout.allocation["bits"] == r0["allocation"]["bits"]
    assert store.layout.allocation["sensitivity"] == {k: r0["sensitivities"][k] for k in r0["allocation"]["bits"]}
    for k, v in enc0.items():
        assert torch.equal(v, enc1[k]), k
        tau = v - start[k]
        bits = r0["allocation"]["bits"].get(k)
        want = tau if bits is None else QTensor.quantize(tau, QuantSpec(bits)).dequantize()
        assert torch.equal(store.task_vector("a", k), want), k
