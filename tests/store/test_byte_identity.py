"""Stores are byte-identical across refactors: the sha256 of every file of stores built from fixed
synthetic inputs, recorded with the code as it was before quantization schemes became registered
objects. A change here means existing stores would be written differently; do not update the
constants unless the on-disk format is meant to change (then bump the layout version).
The three no-error-correction RTVQ stores were re-recorded for one intended change: their label
(task files' ``scheme`` metadata, hence ``nbytes`` in layout.json) became ``RTVQ-...-noEC``; their
tensors and the rest of their layout were checked equal to the old code's.

Layout version 2 (integrity data) changed layout.json on purpose and nothing else: the data files
(task and base safetensors) must still hash to the recorded values, and layout.json must equal the
recorded version-1 layout once the version-2 additions are taken out (:func:`_as_version_1`: the
per-file ``crc32`` strings and ``layout_crc32`` removed, ``version`` set back to 1, written with
the writer's JSON formatting). The recorded hashes were not regenerated for version 2; the
checksums themselves are checked against the files by ``verify_store``.

Regenerate (only for a deliberate format change): ``python tests/store/test_byte_identity.py``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tvq_lightning.demo.config import SCHEMES
from tvq_lightning.store import StoreConfig, quantize_to_store
from tvq_lightning.store.verify import verify_store


def _weights() -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """theta_0 (self-contained, seeded) and three fine-tunes with zero keys here and there."""
    g = torch.Generator().manual_seed(1234)
    shapes = {"conv.weight": (64, 3, 4, 4), "fc1.weight": (256, 256), "fc1.bias": (256,), "fc2.weight": (96, 800),
              "proj": (40, 24), "ln.weight": (96,), "ln.bias": (96,), "emb": (17, 64)}
    pre = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    pre["half.weight"] = (torch.randn(48, 32, generator=g) * 0.1).half()
    pre["counter"] = torch.tensor(7, dtype=torch.int64)
    fts = {}
    for t in range(3):
        ft = {}
        for k, v in pre.items():
            if not v.is_floating_point():
                ft[k] = v.clone()
                continue
            m = v.float().reshape(v.shape[0], -1)
            low = torch.randn(m.shape[0], 2, generator=g) @ torch.randn(2, m.shape[1], generator=g)
            tau = 1e-3 * (low + 0.5 * torch.randn(m.shape, generator=g))
            ft[k] = (m + tau).reshape(v.shape).to(v.dtype)
        fts[f"t{t}"] = ft
    fts["t1"]["ln.bias"] = pre["ln.bias"].clone()     # a zero full-precision key
    fts["t2"]["proj"] = pre["proj"].clone()           # a zero quantized key
    return pre, fts


def _build(case: str, root: Path) -> Path:
    pre, fts = _weights()
    out = root / case
    name, _, mode = case.partition("+")
    cfg = CONFIGS[name]
    if mode:  # built from two tasks, then the third added
        quantize_to_store(pre, {t: fts[t] for t in ("t0", "t1")}, out, cfg, progress=False)
        quantize_to_store(pre, {"t2": fts["t2"]}, out, cfg, progress=False,
                          **({"rtvq_base": mode} if mode in ("frozen", "recompute") else {}))
    else:
        quantize_to_store(pre, fts, out, cfg, progress=False)
    return out


CONFIGS: dict[str, StoreConfig] = {
    **{f"demo_{k}": v for k, v in SCHEMES.items() if k != "bitdelta"},
    "tvq3_channel": StoreConfig(scheme="tvq", bits=3, granularity="channel"),
    "tvq4_group": StoreConfig(scheme="tvq", bits=4, granularity="group", group_size=100),
    "tvq4_symmetric": StoreConfig(scheme="tvq", bits=4, symmetric=True),
    "fq4_channel": StoreConfig(scheme="fq", bits=4, granularity="channel"),
    "rtvq_no_ec": StoreConfig(scheme="rtvq", error_correction=False),
    "rtvq_group": StoreConfig(scheme="rtvq", base_bits=4, offset_bits=2, granularity="group", group_size=64),
    "tvq_budget_per_tensor": StoreConfig(scheme="tvq", budget=3.0, per_tensor_bits=True),
    "tvq_budget_uniform": StoreConfig(scheme="tvq", budget=2.5),
    "rtvq_budget_per_tensor": StoreConfig(scheme="rtvq", budget=2.0, per_tensor_bits=True),
    "rtvq_no_ec_budget": StoreConfig(scheme="rtvq", budget=3.0, per_tensor_bits=True, error_correction=False),
}
CASES = [*CONFIGS, "demo_tvq4+add", "demo_fp32+add", "demo_rtvq_b3o2+frozen", "demo_rtvq_b3o2+recompute",
         "rtvq_no_ec+frozen"]


def _hashes(store: Path) -> dict[str, str]:
    """sha256 per file; in layout.json the store's own path (a recomputed task's source) is masked."""
    def data(p: Path) -> bytes:
        raw = p.read_bytes()
        return _as_version_1(raw).replace(str(store).encode(), b"<STORE>") if p.name == "layout.json" else raw

    return {p.relative_to(store).as_posix(): hashlib.sha256(data(p)).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file()}


def _as_version_1(raw: bytes) -> bytes:
    """A version-2 layout.json as version 1 wrote it: the integrity fields removed, version 1."""
    data = json.loads(raw)
    assert data.pop("version") == 2 and isinstance(data.pop("layout_crc32"), int)
    files = list(data["tasks"].values()) + ([data["base"]] if data["base"] else [])
    for f in files:
        assert isinstance(f.pop("crc32"), str)
    return (json.dumps({"format": data.pop("format"), "version": 1, **data}, indent=1) + "\n").encode()


EXPECTED: dict[str, dict[str, str]] = {
    'demo_fp32': {
        'layout.json': '67d56882926435e841c5e6cc2208d828a02905864264858da26c57165b19bea7',
        'tasks/t0.g1.safetensors': '401914cb1226f7c3107bdfb25921078d7e8ad50e56f05bba07e7c87e7ff410f0',
        'tasks/t1.g1.safetensors': '34f48ad12ee36f3af6dd8dbba974488a3e6fe5849f32cbca6337c1099d9569e1',
        'tasks/t2.g1.safetensors': '5f5edbba86541b8a4a0b9816c4c1831fd846057b812c18056a524de6ef120797',
    },
    'demo_fq8': {
        'layout.json': '77f5d45774f0291200be2e5cbef38cee55b39281244e4ad46536b4a10b5e8973',
        'tasks/t0.g1.safetensors': '1189ba9ce387d14aae22ad66df7caca05b3c3c33badd19e42217eb0e0ed4bd09',
        'tasks/t1.g1.safetensors': 'bd46068152f7dba1e33fb32b3d974830553e3916aeca3fdaae8f564a35747acc',
        'tasks/t2.g1.safetensors': '289c04b3cd771199a69530dcce3f4e8dc526a85089c09cd74aa435f82f3a86f0',
    },
    'demo_fq4': {
        'layout.json': '05a7c236d590e2df10b194dad1675659188fa9da148044d4d7c7e33b7228ce22',
        'tasks/t0.g1.safetensors': '6008570792b83fcb1167d8cc5cd997036e76b95207fe85876f4d658c0c6bd979',
        'tasks/t1.g1.safetensors': '05b4af4db437c7513b26309c66ad672ef38ae6e26da49fc2b1353b5d972aa7bb',
        'tasks/t2.g1.safetensors': '256de3c5ee66b44cd5b7dfe3e4b313ce101f9af630aaf00ee1f0b43f0dce867b',
    },
    'demo_tvq8': {
        'layout.json': '1e61c55546d7cf7775082edec0086a812c254cbe9dd02ecced4798a51c55e737',
        'tasks/t0.g1.safetensors': 'eaa9c7f915b605185acca6171f19d6a68bf258b3be594f198cc5192b9ffdb0d0',
        'tasks/t1.g1.safetensors': 'ad574d33fbe24f7f11fa4afeb28940cd43b7e683fb1ea0b671410ae5a1f31f59',
        'tasks/t2.g1.safetensors': '03474f337d4efb3944f89d79b64e4774e8dea1d21c9790c6caf4318f093ec404',
    },
    'demo_tvq4': {
        'layout.json': '9e157a23d2cef2eed77ac3cc6b24c4bbd67b1467e4de9c5f33052f785de089f6',
        'tasks/t0.g1.safetensors': 'c3b58228ed209eb985423ebca31c1dcf81b6523734668f7661f97222c493e73a',
        'tasks/t1.g1.safetensors': 'd6d801dddfcf90d2d5d00484e390f89c19cdbffe0f9af186ef882e2bb22eb5a8',
        'tasks/t2.g1.safetensors': '8384b3821d38bb1d3f761449e9cac7c2cd7b13a305644255bb6ad95adfd20910',
    },
    'demo_tvq3': {
        'layout.json': '202678f6c3767dd0dcfb97856e976293c7157e128757b0dd8a44324b511f69e7',
        'tasks/t0.g1.safetensors': '416536d45fb94a29ed9b81bd945be7d9137b3d623f53575263104bc9a72e3f17',
        'tasks/t1.g1.safetensors': '924c5a48c2bbcce2b7a048e279823c59ec0b129dd2606882736479d7424fcb39',
        'tasks/t2.g1.safetensors': 'b308c8cbd9d16000b129b9104b0e8028b15e64184c53f154609da9b3be37aa06',
    },
    'demo_tvq2': {
        'layout.json': '134fcee648ac762e552e22941fc97a60a44dcdbb8d8be07ec56151ee73cdd886',
        'tasks/t0.g1.safetensors': '27c452acbe808db09e3721d52cf5ea810544ccb8fd1fa8bbf03efae5dadf8a7b',
        'tasks/t1.g1.safetensors': 'a87e17a45186089e46ff90a0aa60fc4ce792afda46ca653cd3c9d6d843ec4cff',
        'tasks/t2.g1.safetensors': 'e66455562e602b8f6240e8a01546aabaa5586f9a1d381e33228b194e2db3da41',
    },
    'demo_rtvq_b3o2': {
        'base.g1.safetensors': '4911f1ca1a832b4ac6cb502c1fe395336997603bcdcb77688c3bc49b79b96f93',
        'layout.json': '1928cbfd1eb2b2a693e58afb4baab8825ab019e25657b88e3e7a3ece9eee9f86',
        'tasks/t0.g1.safetensors': '0b528f1d09efda32ee92c33a35252d2934b399b5a5ae895960883012d53d7b54',
        'tasks/t1.g1.safetensors': 'ef41ad451405975bf415f8844b975c91475d9f73bce25b62ce9de4497a96a579',
        'tasks/t2.g1.safetensors': 'ab3f30009883bd15e2854e9424c6b7e05226318c090181b7029c4ed21e244cd4',
    },
    'demo_budget': {
        'base.g1.safetensors': '919db81a60e35452a541b80158ac843a739035c6bc164fbe4b7df7f4d1781856',
        'layout.json': 'e95465cd1f120d30c15ef6c524cc3f3d0431a2b3958728815b1586c1d43e1b01',
        'tasks/t0.g1.safetensors': '2518a3f4ad472f42162fb29b3f4940441ea80d0207c139f87542551582d46f5a',
        'tasks/t1.g1.safetensors': 'd465730a25d6ff9ea6f511039312da573a6612baf850edf935491227c883e055',
        'tasks/t2.g1.safetensors': 'c79b4157c318e7b7f76869d4c9da230536e7d3521d05e94a5b317f73aaf5a5bb',
    },
    'tvq3_channel': {
        'layout.json': '4b377c23e39979d564b861706d87ce2e0e51611878d453334a3aa956a98900dd',
        'tasks/t0.g1.safetensors': 'db1c1053f2c6e8ed1d9b2fc5668d7bd044e81b0e65f7eb54461d33e9474f9a29',
        'tasks/t1.g1.safetensors': 'fee0e65de15db9d41e7a24282391293438e28fb9a66d957ef124255744f21fa3',
        'tasks/t2.g1.safetensors': 'bb140cc6cf6603c156652e4d64b466a8f11370feb41a72316a4b7dac1a82494a',
    },
    'tvq4_group': {
        'layout.json': '7bc0a80a3002cf1012e2f4847a0a6b3773671f08549d2a2c914f0429681b935d',
        'tasks/t0.g1.safetensors': '72c30514ac0064299fdb17f3950948aaa35b8a74f0fb5972cf94d3087171fae0',
        'tasks/t1.g1.safetensors': '7fd73b231488de43c9eab84254fe868a62d45477d76084306ad631322c8fc54e',
        'tasks/t2.g1.safetensors': 'd0abf9f48e69c7f66cd51fd80621e3a049acdb848b2a4e8bb473d1452f370d5f',
    },
    'tvq4_symmetric': {
        'layout.json': '47c2440510c7b9474118c77bde9d97254a2916c4521a1edfb097e1c5b35cc202',
        'tasks/t0.g1.safetensors': 'e20c3bf79b9e20fda7bbd4f5b95b75b71096b6618edd6b7e8ce53838bb7f6323',
        'tasks/t1.g1.safetensors': '39ce6b6aaa74d7200c98bd23e2d5e2d15f3dbe7ae5bd78cccf641cb69c0d6390',
        'tasks/t2.g1.safetensors': '8261844bd731109c8545396a16de4e21013595af9f9c702d6e0a43daeb14211c',
    },
    'fq4_channel': {
        'layout.json': '6cd38b9aa5ff070211665d8b30fe33b4b49d916cb1e3508daa306bc09863fb89',
        'tasks/t0.g1.safetensors': 'de3416129f79901b02fdde7dbef28bf32aa62dd71ccc58dd6e3acf734bbd3b63',
        'tasks/t1.g1.safetensors': '1b0ecc6a186206d7b90ccf99312347d7cef17796a4603fd429e242e864daed55',
        'tasks/t2.g1.safetensors': 'a4416a5b91019e2020f0517a677e97644eab133d50183a722adcd88a01768484',
    },
    'rtvq_no_ec': {  # the -noEC label in the task files' metadata (bug fix); tensors unchanged
        'base.g1.safetensors': 'f0dc145d6e81620a6dcce8330f7021ba6be4db81bef68c3b7d72296f6e91ea01',
        'layout.json': 'd8643401aac22532869ffad10df6d454fe2ff5736ace2ea52cad0c44dc556022',
        'tasks/t0.g1.safetensors': 'd6ae0833bfeea6ef56e818edaba39bcae162962872491e173d7fe11083bffe8f',
        'tasks/t1.g1.safetensors': '03c2c293306930c67d7c9220fb9d23f36aa6e638736f65ccab84ba4c2503108e',
        'tasks/t2.g1.safetensors': 'c94d3730deada573e298f4febf6e5a395f4a14784816bd0714bc8fb557223bed',
    },
    'rtvq_group': {
        'base.g1.safetensors': '5c12735955b0780e64635257802aced28f5afdebcca5d7c01e07df4c09c7737f',
        'layout.json': 'fe78bcdef4e9fda88a4fe514f60eb2e897d281f2a5644fb67ac5ad1f304d6306',
        'tasks/t0.g1.safetensors': '7122bbfd59486b267a5c7857e8712210fa9c9bae227c6ac74fae871330573d2f',
        'tasks/t1.g1.safetensors': 'f44d64000762e1573590ef949b422c0e7cd7c5c542c0e48de0500f80a5f486ae',
        'tasks/t2.g1.safetensors': '704cc1d44e2792941e56c38eed930bf686c4a75ca58e7b3db1e8c739fe850ec8',
    },
    'tvq_budget_per_tensor': {
        'layout.json': '94ac547b72cffa82fa3a47e1b14e4935b68c42d272da991178da516c52529e06',
        'tasks/t0.g1.safetensors': 'c6e3bd7f3f0d8323add208051f2f40c10ba7716c9223d1b17dab3d69ccf4636a',
        'tasks/t1.g1.safetensors': 'd002e0e77c7a9a7b727732ef89a53979e8a5bdd5c9845e91631ece2614aa4b52',
        'tasks/t2.g1.safetensors': '1074fa793f46c5ab844716478f3eed14f3294e956def942ba9f38eb29ca26c81',
    },
    'tvq_budget_uniform': {
        'layout.json': 'dc0537e74127c0677cb87fa5cb19932396863adc7db99450f89a7c91034c74a1',
        'tasks/t0.g1.safetensors': 'b62ca315ab490dc190cfc1a6a0b00e1e633362cf0ce7bd37d41af9feb77d9359',
        'tasks/t1.g1.safetensors': '768e3aa28b271c08bb6e531b1cdc5d9cd93f28b54883310bc7f698b7be93774e',
        'tasks/t2.g1.safetensors': '6333cb056e21c83202ee6028c715688e041999d3bedd6650c830a610ae08998f',
    },
    'rtvq_budget_per_tensor': {
        'base.g1.safetensors': '15aecc1df76e335c91f91933c625bd30afad8758298c02b0d1a38c69eb68f1f3',
        'layout.json': '74f2487af9f7be85a1d1152c8581fdada93387fc489565be39e434699f1b22ac',
        'tasks/t0.g1.safetensors': '4739efa94fd3c64251be2e7c85f9ee18718d9740e03367a1053f91a486a60ae9',
        'tasks/t1.g1.safetensors': 'c1e19c0f7d6ade62e9b87130e788973d7a96bc47dc396244209be7c2070ee0bc',
        'tasks/t2.g1.safetensors': 'e012096438e0e3d15ee81f9a3fed5b7ab26be43238c10af202e9e9f59251cceb',
    },
    'rtvq_no_ec_budget': {  # the -noEC label in the task files' metadata (bug fix); tensors unchanged
        'base.g1.safetensors': '309b2243b48a1bb9bf7444fc0dc54192c93e9e0b7e0669c0025d0321178e0430',
        'layout.json': 'a8ea49bfc875e35b64047e77169b40a29a99d827a4efb86d5da5f5492d2c0543',
        'tasks/t0.g1.safetensors': 'a5ee0885d3af99346610d0123262c35d244b607e1c86a294ab60256dfc71da79',
        'tasks/t1.g1.safetensors': 'cffab1b41cb5026e9ece3464cec9f9e038f2f0a8186a81665e896a0a49517346',
        'tasks/t2.g1.safetensors': 'c613b8a979496f3dc91035ac0f30b98413844bf2837ffe264045444c2203c346',
    },
    'demo_tvq4+add': {
        'layout.json': '9e157a23d2cef2eed77ac3cc6b24c4bbd67b1467e4de9c5f33052f785de089f6',
        'tasks/t0.g1.safetensors': 'c3b58228ed209eb985423ebca31c1dcf81b6523734668f7661f97222c493e73a',
        'tasks/t1.g1.safetensors': 'd6d801dddfcf90d2d5d00484e390f89c19cdbffe0f9af186ef882e2bb22eb5a8',
        'tasks/t2.g1.safetensors': '8384b3821d38bb1d3f761449e9cac7c2cd7b13a305644255bb6ad95adfd20910',
    },
    'demo_fp32+add': {
        'layout.json': '67d56882926435e841c5e6cc2208d828a02905864264858da26c57165b19bea7',
        'tasks/t0.g1.safetensors': '401914cb1226f7c3107bdfb25921078d7e8ad50e56f05bba07e7c87e7ff410f0',
        'tasks/t1.g1.safetensors': '34f48ad12ee36f3af6dd8dbba974488a3e6fe5849f32cbca6337c1099d9569e1',
        'tasks/t2.g1.safetensors': '5f5edbba86541b8a4a0b9816c4c1831fd846057b812c18056a524de6ef120797',
    },
    'demo_rtvq_b3o2+frozen': {
        'base.g1.safetensors': '8b782569a70702ecd387bf2731cc519185237d3f81194ed23392b9bbf5821e0d',
        'layout.json': 'fdc09a84b3a66423ecfe49f562ed421538ca608a75ddc7e128e819e137e054bc',
        'tasks/t0.g1.safetensors': '6bde839e9e574aefeb5a392aaafb5a372b0f7d8dc4078cc4aa7309114f2456bb',
        'tasks/t1.g1.safetensors': '8fa49dc39fc8bda57ae8307419dc55039cca8236aa503f45d908d6ba2d4c0f2e',
        'tasks/t2.g1.safetensors': '9daa7a2378e76da3dfbc30a510cf669f87d522bbfa8294f8021cdbb0cd2589b8',
    },
    'demo_rtvq_b3o2+recompute': {
        'base.g2.safetensors': '151146f52ba2e7e3409b62712a8adc87dc3308928869fe520bb71f728accc46d',
        'layout.json': '41e3aac32aadc360d2029e8a866e45234064fc1b76432a12b5519c0ab9480ab1',
        'tasks/t0.g2.safetensors': 'fa831c32267b38e98054ad858596eb468b7d5df1508ccb4b6972dea5f3676c84',
        'tasks/t1.g2.safetensors': '32414bcc295d2ceb32d7727c3d5ca89c29ce1af43680383c054d2d73370c87bd',
        'tasks/t2.g2.safetensors': '6c47ab51a41b4452becb8c9777a6b2fdd533a91a819e845845720388431148f2',
    },
    'rtvq_no_ec+frozen': {  # the -noEC label in the task files' metadata (bug fix); tensors unchanged
        'base.g1.safetensors': 'e4e4ef7c00f84ed720d80e023828e3fee04a9d826678b692cc96040da682fece',
        'layout.json': 'c50c066fa5ffebd8b526357fc9f1d08d6f400c8d78da78bb1eb3b98ee5c0654e',
        'tasks/t0.g1.safetensors': '3a6153062171f7e3eac79e8ddca7b748842a981f0b24e9d59d4f8b720dafe752',
        'tasks/t1.g1.safetensors': 'aeae860be930dc25b5eba06853ac5a90660dc77be178918e0eb6cdedeac7b02b',
        'tasks/t2.g1.safetensors': 'f04d88f3e6dca3ba4556706a43afc77a894590be23315d8906e871ac48837f5a',
    },
}


@pytest.mark.parametrize("case", CASES)
def test_store_bytes_unchanged(tmp_path, case):
    store = _build(case, tmp_path)
    assert _hashes(store) == EXPECTED[case]
    report = verify_store(store)
    assert report.ok and report.verified_tensors > 0, report.format()


if __name__ == "__main__":  # print the constants (a deliberate format change only)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print("EXPECTED: dict[str, dict[str, str]] = {")
        for c in CASES:
            print(f"    {c!r}: {{")
            for rel, h in _hashes(_build(c, Path(tmp))).items():
                print(f"        {rel!r}: {h!r},")
            print("    },")
        print("}")
