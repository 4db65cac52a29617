"""Expert store: quantization quality, record round trips, and clear errors for damaged files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from edgeopt.errors import InputError
from edgeopt.models.moe import MoEConfig, MoELM
from edgeopt.moe.offload import OffloadedLM, pack
from edgeopt.moe.quant import QuantSpec, quantize
from edgeopt.moe.store import ExpertStore

CFG = MoEConfig(d_model=64, n_layers=3, n_heads=4, n_experts=4, d_ff=128)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = MoELM(CFG).eval()
    d = tmp_path_factory.mktemp("moe")
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(d / "m.safetensors"), metadata={"config": json.dumps(CFG.to_dict())})
    return pack(d / "m.safetensors", d / "store")


@pytest.mark.parametrize("bits,group,max_rel", [(4, 64, 0.13), (2, 32, 0.5)])
def test_hqq_beats_minmax_and_is_accurate(bits, group, max_rel):
    torch.manual_seed(0)
    w = torch.randn(256, 128) * 0.05
    w[torch.rand_like(w) < 0.01] *= 6  # outliers, where the lp-norm zero-point optimizer helps
    spec = QuantSpec(bits, group)
    errs = {}
    for optimize in (False, True):
        q = quantize(w, spec, optimize=optimize)
        errs[optimize] = ((w - q.dequantize()).norm() / w.norm()).item()
    assert errs[True] < errs[False]
    assert errs[True] < max_rel
    q = quantize(w, spec)
    assert q.nbytes == w.numel() * bits // 8 + 2 * 2 * w.numel() // group


def test_records_round_trip(store_dir):
    store = ExpertStore(store_dir)
    model = MoELM(CFG)
    from edgeopt.models import load_checkpoint

    load_checkpoint(model, store_dir.parent / "m.safetensors")
    experts = model.layers[1].moe.experts
    hi = store.read(1, 2, "fp16")
    gate_up, down = hi.weights()
    assert torch.equal(gate_up, experts.gate_up_proj[2].float()) and torch.equal(down, experts.down_proj[2].float())
    lo = store.read(1, 2, "int4")
    assert lo.nbytes < hi.nbytes / 3
    rel = (lo.weights()[0] - gate_up).norm() / gate_up.norm()
    assert rel < 0.15
    assert store.read(1, 2, "int2").nbytes < lo.nbytes
    store.close()


def test_truncated_store_is_input_error(store_dir, tmp_path):
    import shutil

    bad = tmp_path / "store"
    shutil.copytree(store_dir, bad)
    data = (bad / "experts.safetensors").read_bytes()
    (bad / "experts.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(InputError, match="truncated"):
        ExpertStore(bad)
    (bad / "experts.safetensors").write_bytes(data[:5])
    with pytest.raises(InputError, match="truncated"):
        ExpertStore(bad)


def test_corrupted_record_is_input_error(store_dir, tmp_path):
    import shutil

    bad = tmp_path / "store"
    shutil.copytree(store_dir, bad)
    data = bytearray((bad / "experts.safetensors").read_bytes())
    store = ExpertStore(bad)
    offset, length = store.offsets["l0.e1.fp16"]
    store.close()
    data[offset + length // 2] ^= 0xFF
    (bad / "experts.safetensors").write_bytes(bytes(data))
    # The damage surfaces when the loader thread reads that record, as a one-line InputError.
    lm = OffloadedLM(bad, "lru-fp16", budget_fraction=0.25)
    with pytest.raises(InputError, match="corrupted expert store record l0.e1.fp16"):
        for e in range(CFG.n_experts):
            lm.engine.run_experts(0, torch.randn(1, CFG.d_model), torch.tensor([[e, (e + 1) % 4]]), torch.tensor([[0.5, 0.5]]))
    lm.close()


def test_not_a_store_is_input_error(tmp_path):
    with pytest.raises(InputError, match="not an expert store"):
        ExpertStore(tmp_path)
    (tmp_path / "store.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read"):
        ExpertStore(tmp_path)


def _file_records(store: ExpertStore) -> dict[str, bytes]:
    data = (store.path / "experts.safetensors").read_bytes()
    return {name: data[offset : offset + length] for name, (offset, length) in store.offsets.items()}


def test_direct_reads_return_the_records_and_keep_zlib_checksums(store_dir):
    """Records come back whole through O_DIRECT (their offsets are not block-aligned), and the checksums are
    zlib's crc32 (stores packed before zlib-ng stay readable)."""
    import zlib

    store = ExpertStore(store_dir)
    if store._direct_fd is None:
        pytest.skip("this file system has no O_DIRECT; reads are buffered (test below)")
    expected = _file_records(store)
    assert any(offset % 4096 for offset, _ in store.offsets.values())
    for name, blob in expected.items():
        layer, expert, precision = name[1:].split(".", 2)
        got = store.read_raw(int(layer), int(expert[1:]), precision)
        assert got.tobytes() == blob and got.flags.writeable
        assert store.manifest["crc32"][name] == zlib.crc32(blob)
    store.close()


def test_read_falls_back_to_buffered_when_direct_io_is_refused(store_dir, monkeypatch):
    import errno
    import os

    import edgeopt.moe.store as store_module

    store = ExpertStore(store_dir)
    refused = []
    real_preadv = os.preadv

    def preadv(fd, buffers, offset):
        if fd == store._direct_fd:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(store_module.os, "preadv", preadv)
    expected = _file_records(store)
    assert store.read_raw(2, 3, "int4").tobytes() == expected["l2.e3.int4"]
    assert refused or store._direct_fd is None
    store.close()
