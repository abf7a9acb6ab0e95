"""FusionBench NYUv2 checkpoints (encoder. + decoders.<task>. keys) -> a store + DenseHead files."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("segmentation_models_pytorch")
tv = pytest.importorskip("torchvision")

from tvq_lightning.models.dense import DenseEncoder, DenseHead  # noqa: E402
from tvq_lightning.store import StoreConfig, TaskVectorStore  # noqa: E402
from tvq_lightning.store.fusionbench_nyuv2 import import_fusionbench_nyuv2  # noqa: E402

OUT = {"segmentation": 13, "depth": 1}


def fusionbench_standin(seed: int, tasks=OUT) -> dict[str, torch.Tensor]:
    """A FusionBench-layout state dict: a (ResNet-18 stand-in) encoder and torchvision DeepLab heads."""
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead

    torch.manual_seed(seed)
    sd = {f"encoder.{k}": v for k, v in DenseEncoder("resnet18", output_stride=8).state_dict().items()}
    for task, n in tasks.items():
        head = DeepLabHead(512, n)
        with torch.no_grad():
            for name, b in head.named_buffers():
                if name.endswith(("running_mean", "running_var")):
                    b.uniform_(0.5, 1.5)
        sd.update({f"decoders.{task}.{k}": v for k, v in head.state_dict().items()})
    return sd


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fb")
    pre = tv.models.resnet18(weights=None).state_dict()           # torchvision's layout, fc included
    fts = {t: fusionbench_standin(i + 1) for i, t in enumerate(OUT)}
    torch.save(fts["segmentation"], root / "seg.pt")
    out = import_fusionbench_nyuv2(pre, {"segmentation": root / "seg.pt", "depth": fts["depth"]}, root / "store",
                                   root / "heads", StoreConfig("fp32"), encoder="resnet18")
    return root, pre, fts, out


def test_store_holds_encoder_task_vectors(converted):
    root, pre, fts, out = converted
    with TaskVectorStore(out["store"]) as st:
        assert st.tasks == ["segmentation", "depth"]
        key = "layer4.1.conv2.weight"
        tau = st.task_vector("depth", key, pre[key])
        torch.testing.assert_close(tau, fts["depth"][f"encoder.{key}"] - pre[key])
    enc = DenseEncoder("resnet18", weights=str(out["pretrained"]), output_stride=8)
    assert torch.equal(enc.state_dict()["conv1.weight"], pre["conv1.weight"]) and "fc.weight" not in enc.state_dict()


def test_heads_equal_torchvision_deeplab(converted):
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead

    root, _, fts, out = converted
    tvh = DeepLabHead(512, 1).eval()
    tvh.load_state_dict({k[len("decoders.depth."):]: v for k, v in fts["depth"].items() if k.startswith("decoders.depth.")})
    head = DenseHead.load(out["heads"]["depth"]).eval()
    assert head.config["decoder"] == "deeplabv3" and head.config["out_channels"] == 1
    feats = [torch.randn(2, c, 32 // s, 48 // s) for c, s in zip((3, 64, 64, 128, 256, 512), (1, 2, 4, 8, 8, 8))]
    with torch.no_grad():
        want = F.interpolate(tvh(feats[-1]), size=(32, 48), mode="bilinear", align_corners=False)
        torch.testing.assert_close(head(feats), want)
