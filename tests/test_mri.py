import math

import numpy as np
import pandas as pd
import pytest
import torch

from darwin import mri
from darwin.checkpoint import Checkpoint, st_dtype
from flows.cli import main


def direct_stats(t: torch.Tensor) -> dict:
    """An independent computation of docs/method.md's statistics, in float64 with numpy's histogram."""
    import numpy as np

    x = t.double().numpy().reshape(-1)
    counts, _ = np.histogram(x, bins=256, range=(x.min(), x.max()))
    p = counts[counts > 0] / x.size
    return {"norm": float(np.sqrt((x ** 2).sum())), "std": float(x.std(ddof=1)),
            "entropy": float(-(p * np.log2(p)).sum()) if x.max() > x.min() else 0.0}


@pytest.mark.parametrize("tensor", [
    torch.randn(64, 48, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16),
    (torch.randn(1001, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.float16),
    torch.rand(1000, generator=torch.Generator().manual_seed(2)) * 7 - 3,
    torch.arange(12.0).reshape(3, 4),
])
def test_stats_match_a_direct_computation(tensor):
    got, want = mri.tensor_stats(tensor), direct_stats(tensor)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-4), key


@pytest.mark.skipif(mri._kernels is None, reason="the C kernel is not built")
@pytest.mark.parametrize("shape", [(3, 1001), (17, 65538)])  # counted directly / in tables, 1 left over
def test_bit_pattern_counts_of_the_kernel_equal_torch_bincount(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)[:, 1:]  # strided, odd
    want = torch.bincount(x.contiguous().view(torch.int16).reshape(-1).to(torch.int32) & 0xFFFF, minlength=1 << 16)
    assert np.array_equal(mri.bit_pattern_counts(x), want.numpy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_statistics_of_raw_bits_equal_the_tensors(dtype):
    """The merge counts a parent's raw bits without torch; `darwin profile` counts the tensor: one result."""
    x = (torch.randn(300, 70, generator=torch.Generator().manual_seed(5)) * 0.03).to(dtype)
    raw = x.view({torch.bfloat16: torch.int16}.get(dtype, dtype)).numpy()
    assert mri.array_stats(raw, st_dtype(dtype)) == mri.tensor_stats(x)


def test_sixteen_bit_statistics_with_inf_or_nan_are_torchs():
    x = torch.tensor([1.0, float("inf"), -2.0], dtype=torch.bfloat16)
    stats = mri.tensor_stats(x)
    assert stats["norm"] == math.inf and math.isnan(stats["entropy"])
    assert math.isnan(mri.tensor_stats(torch.tensor([1.0, float("nan")], dtype=torch.float16))["std"])


def test_constant_tensor_has_zero_entropy_and_uniform_has_eight_bits():
    assert mri.tensor_stats(torch.full((10, 10), 3.0))["entropy"] == 0.0
    assert mri.tensor_stats(torch.arange(256 * 4).float())["entropy"] == pytest.approx(8.0)


def test_static_scores_follow_spec():
    stats = {"entropy": 6.0, "std": 0.5, "norm": 150.0}
    assert mri.static_score(stats, "v5") == pytest.approx(6 * 0.5 + 0.5 * 0.3 + 100 * 0.002)
    assert mri.static_score(stats, "v6") == pytest.approx(6 * 0.3 + 0.5 * 0.2 + 100 * 0.002)


def test_profile_flow_fans_out_per_shard(prefect_api, pico_checkpoint, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.mri import profile_flow

    path = pico_checkpoint("qwen3_5")
    checkpoint = Checkpoint(path)
    state = profile_flow(str(path), str(tmp_path / "mri"), device="cpu", label="father", return_state=True)
    frame = pd.read_parquet(state.result())
    assert set(mri.COLUMNS) <= set(frame.columns)
    assert len(frame) == len(checkpoint.tensors)
    assert set(frame["shard"]) == set(checkpoint.shards)
    row = frame.set_index("name").loc["model.language_model.layers.2.mlp.up_proj.weight"]
    assert (row["kind"], row["block"], row["numel"]) == ("mlp", 2, 64 * 128)
    assert row["std"] == pytest.approx(direct_stats(checkpoint.read(row.name))["std"], rel=1e-4)
    assert (tmp_path / "mri" / "mri.png").read_bytes()[:4] == b"\x89PNG"

    import anyio

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def artifacts():  # this run's: the session's server holds other runs' of the same keys
        async with get_client() as client:
            return {a.key: a for a in await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))}

    found = anyio.run(artifacts)
    assert {"mri-father", "mri-father-heatmap"} <= set(found)
    assert found["mri-father-progress"].type == "progress" and found["mri-father-progress"].data == 100.0


def test_profile_cli(prefect_api, pico_checkpoint, tmp_path):
    assert main(["profile", str(pico_checkpoint("llama")), "--out", str(tmp_path / "p"), "--device", "cpu"]) == 0
    frame = pd.read_parquet(tmp_path / "p" / "mri.parquet")
    assert math.isfinite(frame["entropy"].sum()) and (frame["kind"] != "other").all()


@pytest.mark.parametrize("family", ["gemma4_moe_text", "qwen3_moe"])
def test_experts_get_a_row_each(pico_checkpoint, family):
    """A fused expert tensor is profiled whole and slice by slice (`NAME[e]`, the statistics of that expert's
    slice); a per-expert tensor's row names its expert; the per-kind summary and the heatmap count whole tensors."""
    checkpoint = Checkpoint(pico_checkpoint(family))
    frame = mri.to_frame([row for shard in checkpoint.shards for row in mri.profile_shard(checkpoint, shard)])
    whole = mri.tensor_rows(frame)
    assert list(whole["name"]) == list(checkpoint.tensors)
    fused = [name for name in checkpoint.tensors if name.endswith("experts.gate_up_proj")]
    assert bool(fused) == (family == "gemma4_moe_text")
    for name in fused:
        tensor = checkpoint.read(name)
        slices = frame[frame["name"].str.startswith(name + "[")]
        assert list(slices["expert"]) == list(range(tensor.shape[0]))
        for row in slices.itertuples():
            expected = mri.tensor_stats(tensor[row.expert])
            assert (row.norm, row.std, row.entropy) == (expected["norm"], expected["std"], expected["entropy"])
            assert row.numel == tensor[0].numel() and row.kind == "expert"
    per_expert = whole[whole["name"].str.contains(r"\.experts\.\d+\.")]
    assert (family == "qwen3_moe") == (len(per_expert) > 0)
    assert list(per_expert["expert"]) == [int(n.split(".experts.")[1].split(".")[0]) for n in per_expert["name"]]
    assert whole.loc[~whole["name"].str.contains(".experts."), "expert"].isna().all()
    summary = {row["kind"]: row["tensors"] for row in mri.summary_table(frame)}
    assert sum(summary.values()) == len(checkpoint.tensors)
