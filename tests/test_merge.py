import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from darwin import masks
from darwin.checkpoint import Checkpoint, to_raw, to_torch, torch_dtype
from darwin.errors import DarwinError
from darwin.genome import Genome
from darwin.merge import engine, merge_into_model, merge_to_dir, methods, plan_merge
from darwin.profiles import ParentProfile, read_stats
from flows.cli import main

V5 = dict(global_ratio=0.5, attn_ratio=0.3, ffn_ratio=0.7, embed_ratio=0.5, density_a=0.8, density_b=0.6)


def v5(**overrides):
    return Genome.from_dict(dict(V5, **overrides))


def v6(**overrides):
    genes = dict(V5, **{f"block_{k}": 0.5 for k in range(2)}, mri_trust=0.0, merge_method_weight=1.0)
    genes.update(overrides)
    return Genome.from_dict(genes)


def reference_uniforms(genome_hash: str, name: str, numel: int):
    """docs/method.md's mask numbers, written independently with numpy's wrapping uint64 arithmetic."""
    seed = np.uint64(int.from_bytes(hashlib.sha256(f"{genome_hash}:{name}".encode()).digest()[:8], "big"))
    with np.errstate(over="ignore"):
        z = seed + (np.arange(numel, dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    u_b = (z >> np.uint64(40)).astype(np.float64) / 2**24
    u_a = ((z >> np.uint64(16)) & np.uint64(0xFFFFFF)).astype(np.float64) / 2**24
    return u_a, u_b


@pytest.fixture(scope="module")
def parents(pico_checkpoint):
    family = "qwen3_5_text"
    return {"base": Checkpoint(pico_checkpoint(family)), "father": Checkpoint(pico_checkpoint(family, perturb=1)),
            "mother": Checkpoint(pico_checkpoint(family, perturb=2))}


def raw_bytes(directory, name):
    with safe_open(directory / json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"][name],
                   "pt") as handle:
        return handle.get_tensor(name).view(torch.uint8).numpy().tobytes()


def all_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.safetensors"))}


def test_mask_numbers_match_an_independent_reference():
    genome_hash = v6().hash
    u_a, u_b = masks.uniforms(masks.tensor_seed(genome_hash, "x.weight"), 5000)
    ref_a, ref_b = reference_uniforms(genome_hash, "x.weight", 5000)
    assert np.array_equal(u_a.numpy(), ref_a) and np.array_equal(u_b.numpy(), ref_b)
    keep_a, keep_b = masks.keep_masks(masks.tensor_seed(genome_hash, "x.weight"), 1000, 5000, 0.3, 0.7)
    assert torch.equal(keep_b, torch.from_numpy(ref_b[1000:] < 0.7))
    assert torch.equal(keep_a, torch.from_numpy(ref_a[1000:] < 0.3))


def test_darwin_v5_follows_the_formula(parents, tmp_path):
    genome = Genome.from_dict(V5)
    plan = plan_merge(parents["father"], parents["mother"], genome, "darwin-v5")
    out = merge_to_dir(plan, tmp_path / "child")
    report = json.loads((out / "merge_report.json").read_text())
    assert report["genome_hash"] == genome.hash and report["method"] == "darwin-v5"
    child = Checkpoint(out)
    name = "model.layers.1.mlp.up_proj.weight"
    row = report["tensors"][name]
    assert row["kind"] == "mlp" and row["genome_ratio"] == 0.7 and row["transplant"] is None
    assert row["final_ratio"] == pytest.approx(0.7 * row["mri_ratio"] + 0.3 * 0.7, abs=1e-6)
    a, b = parents["father"].read(name).float(), parents["mother"].read(name).float()
    _, u_b = reference_uniforms(genome.hash, name, a.numel())
    keep = torch.from_numpy(u_b < V5["density_b"]).reshape(a.shape)
    expected = (a + (b - a) * keep * row["final_ratio"]).to(torch.bfloat16)
    got = child.read(name)
    assert torch.equal(got, expected)
    assert torch.equal(got[~keep], parents["father"].read(name)[~keep])
    differs = (b != a)
    kept_rate = ((got.float() != a) & differs).sum() / differs.sum()
    assert kept_rate == pytest.approx(V5["density_b"], abs=0.03)


def test_dare_ties_matches_a_direct_torch_computation(parents, tmp_path):
    genome = Genome.from_dict(V5)
    plan = plan_merge(parents["father"], parents["mother"], genome, "dare-ties", base=parents["base"])
    out = merge_to_dir(plan, tmp_path / "child")
    report = json.loads((out / "merge_report.json").read_text())
    for name in ["model.layers.0.linear_attn.in_proj_qkv.weight", "model.layers.3.mlp.down_proj.weight"]:
        r = report["tensors"][name]["final_ratio"]
        a, b, c = (parents[k].read(name).double() for k in ("father", "mother", "base"))
        u_a, u_b = (torch.from_numpy(u).reshape(a.shape) for u in reference_uniforms(genome.hash, name, a.numel()))
        tv_a = (a - c) * (u_a < V5["density_a"]) / V5["density_a"] * min(1, 2 * (1 - r))
        tv_b = (b - c) * (u_b < V5["density_b"]) / V5["density_b"] * min(1, 2 * r)
        sign = torch.where(tv_a + tv_b >= 0, 1.0, -1.0).double()
        in_a, in_b = (torch.sign(tv_a) == sign), (torch.sign(tv_b) == sign)
        expected = c + tv_a * in_a + tv_b * in_b
        got = Checkpoint(out).read(name).double()
        # float32 in the engine against float64 here: equal after rounding to bf16 but for values on a rounding
        # boundary, which move by one bf16 step (2^-8 relative) at most
        assert torch.allclose(got, expected, rtol=2**-7, atol=1e-6)
        assert (got != expected.to(torch.bfloat16).double()).float().mean() < 0.05


def test_output_is_byte_identical_across_runs_threads_and_chunking(parents, tmp_path, monkeypatch):
    genome = v6(merge_method_weight=0.4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = merge_to_dir(plan_merge(parents["father"], parents["mother"], genome, "darwin-v6"), tmp_path / "one")
        torch.set_num_threads(1)
        monkeypatch.setattr(masks, "CHUNK", 777)
        monkeypatch.setattr(engine, "DIRECT_CHUNK", 777)
        second = merge_to_dir(plan_merge(parents["father"], parents["mother"], genome, "darwin-v6"), tmp_path / "two")
    finally:
        torch.set_num_threads(threads)
    assert all_bytes(first) == all_bytes(second)
    other = merge_to_dir(plan_merge(parents["father"], parents["mother"], v6(merge_method_weight=0.41),
                                    "darwin-v6"), tmp_path / "three")
    assert all_bytes(first) != all_bytes(other)


def test_transplant_is_a_byte_copy(parents, tmp_path):
    # mri_trust 0: final = genome ratio; attention from the father, MLPs from the mother, the rest merged
    genome = v6(attn_ratio=0.0, ffn_ratio=1.0, global_ratio=0.5, embed_ratio=0.5)
    out = merge_to_dir(plan_merge(parents["father"], parents["mother"], genome, "darwin-v6"), tmp_path / "child")
    report = json.loads((out / "merge_report.json").read_text())["tensors"]
    for name, row in report.items():
        if row["kind"] in ("attn", "linear_attn"):
            assert row["transplant"] == "father"
            assert raw_bytes(out, name) == raw_bytes(parents["father"].path, name)
        if row["kind"] == "mlp":
            assert row["transplant"] == "mother"
            assert raw_bytes(out, name) == raw_bytes(parents["mother"].path, name)
        if row["kind"] == "embed":
            assert row["transplant"] is None


def test_block_genes_shift_the_kind_ratio():
    genome = v6(ffn_ratio=0.6, block_0=0.2, block_1=0.9)
    assert genome.ratio("mlp", 0, 4) == pytest.approx(0.3)
    assert genome.ratio("mlp", 3, 4) == pytest.approx(1.0)
    assert genome.ratio("mlp", None, 4) == pytest.approx(0.6)
    assert genome.ratio("norm", 1, 4) == pytest.approx(0.2)


def test_bad_genomes_are_refused_with_nothing_written(parents, tmp_path):
    for genes, message in [({**V5, "density_b": 1.5}, "density_b must be a number in \\[0, 1\\]"),
                           ({k: v for k, v in V5.items() if k != "ffn_ratio"}, "missing ffn_ratio"),
                           ({**V5, "warp": 0.1}, "unknown warp")]:
        (tmp_path / "genome.json").write_text(json.dumps(genes))
        code = main(["merge", "--father", str(parents["father"].path), "--mother", str(parents["mother"].path),
                     "--genome", str(tmp_path / "genome.json"), "--method", "darwin-v5", "--out",
                     str(tmp_path / "out")])
        assert code == 2
        with pytest.raises(DarwinError, match=message):
            Genome.from_dict(genes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genome.json"]


def test_mismatched_parents_are_refused_before_writing(pico_checkpoint, parents, tmp_path):
    with pytest.raises(DarwinError, match="father and mother do not match"):
        plan_merge(parents["father"], Checkpoint(pico_checkpoint("llama")), Genome.from_dict(V5), "darwin-v5")
    with pytest.raises(DarwinError, match="needs the shared base"):
        plan_merge(parents["father"], parents["mother"], Genome.from_dict(V5), "dare-ties")
    with pytest.raises(DarwinError, match="needs a v6 genome"):
        plan_merge(parents["father"], parents["mother"], Genome.from_dict(V5), "darwin-v6")


def test_a_failed_merge_leaves_no_output(parents, tmp_path, monkeypatch):

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(engine, "_merge_values", broken)
    with pytest.raises(RuntimeError):
        merge_to_dir(plan_merge(parents["father"], parents["mother"], Genome.from_dict(V5), "darwin-v5"),
                     tmp_path / "child")
    assert list(tmp_path.iterdir()) == []


def test_child_loads_in_transformers_and_generates(parents, tmp_path):
    from transformers import AutoModelForCausalLM

    (tmp_path / "genome.json").write_text(json.dumps(V5))
    assert main(["merge", "--father", str(parents["father"].path), "--mother", str(parents["mother"].path),
                 "--base", str(parents["base"].path), "--genome", str(tmp_path / "genome.json"),
                 "--method", "dare-ties", "--out", str(tmp_path / "child")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "child")
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


@pytest.mark.parametrize("profiled", [False, True])
def test_cpu_merge_of_bf16_parents_runs_without_torch_or_pandas(parents, tmp_path, profiled):
    """torch's import was most of `darwin merge`'s start-up, pandas' most of the rest with profiles given: the CPU
    engine works on raw bits and reads profiles through pyarrow, so neither loads."""
    from darwin import mri

    genome = tmp_path / "genome.json"
    genome.write_text(json.dumps(V5))
    argv = ["merge", "--father", str(parents["father"].path), "--mother", str(parents["mother"].path), "--base",
            str(parents["base"].path), "--genome", str(genome), "--method", "dare-ties", "--out", str(tmp_path / "child")]
    if profiled:
        for role in ("father", "mother"):
            rows = [row for shard in parents[role].shards for row in mri.profile_shard(parents[role], shard)]
            mri.write_profile(mri.to_frame(rows), tmp_path / role)
            argv += [f"--mri-{role}", str(tmp_path / role)]
    code = (f"import sys; from flows.cli import main; rc = main({argv!r}); "
            "print(rc, 'torch' in sys.modules, 'pandas' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split()[-3:] == ["0", "False", "False"]
    in_process = merge_to_dir(plan_merge(parents["father"], parents["mother"], Genome.from_dict(V5), "dare-ties",
                                         base=parents["base"]), tmp_path / "in-process")
    assert all_bytes(tmp_path / "child") == all_bytes(in_process)


def test_given_profiles_merge_like_statistics_on_the_fly(parents, tmp_path):
    """`--mri-father/--mother` (read without pandas) and statistics counted during the merge: the same child."""
    from darwin import mri

    def merge(profiles, out):
        plan = plan_merge(parents["father"], parents["mother"], Genome.from_dict(V5), "darwin-v5",
                          profiles=tuple(ParentProfile(profiles.get(role, {})) for role in ("father", "mother")))
        return all_bytes(merge_to_dir(plan, tmp_path / out))

    profiles = {}
    for role in ("father", "mother"):
        rows = [row for shard in parents[role].shards for row in mri.profile_shard(parents[role], shard)]
        mri.write_profile(mri.to_frame(rows), tmp_path / role)
        profiles[role] = read_stats(tmp_path / role)
    on_the_fly = merge({}, "fly")
    assert merge(profiles, "given") == on_the_fly
    profiles["mother"]["model.layers.1.mlp.up_proj.weight"]["std"] *= 2  # the merge reads what it is given
    assert merge(profiles, "changed") != on_the_fly
    rows[0]["entropy"] = float("nan")  # a broken tensor's statistic survives the parquet round trip
    mri.write_profile(mri.to_frame(rows), tmp_path / "broken")
    assert np.isnan(read_stats(tmp_path / "broken")[rows[0]["name"]]["entropy"])


def test_in_memory_merge_equals_the_written_child(parents, tmp_path):
    from transformers import AutoModelForCausalLM

    genome = Genome.from_dict(V5)
    plan = plan_merge(parents["father"], parents["mother"], genome, "darwin-v5")
    written = Checkpoint(merge_to_dir(plan, tmp_path / "child"))
    model = AutoModelForCausalLM.from_pretrained(parents["father"].path, dtype=torch.bfloat16)
    merge_into_model(plan, model)
    state = model.state_dict()
    assert all(torch.equal(state[name], written.read(name)) for name in written.tensors)


@pytest.mark.parametrize("numel", [1, 4096, engine.DIRECT_CHUNK + 48_000, 3 * engine.DIRECT_CHUNK - 5, 33_000_000])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_direct_chunks_cover_the_tensor_evenly_over_the_workers(numel, workers):
    chunk = engine.direct_chunk(numel, workers)
    pieces = -(-numel // chunk)
    assert chunk <= max(engine.DIRECT_CHUNK, numel if numel <= engine.DIRECT_CHUNK // 16 else 0)
    if numel > engine.DIRECT_CHUNK // 16:  # no thread waits on a short last chunk beyond one element per piece
        assert pieces % workers == 0 and numel - (pieces - 1) * chunk >= chunk - pieces
    else:
        assert pieces == 1


def test_buffer_ring_hands_memory_back_only_after_depth_takes():
    ring = engine.BufferRing(depth=2)
    first, second = ring.take(100, np.int16), ring.take(50, np.float32)
    assert first.ctypes.data != second.ctypes.data
    third = ring.take(80, np.float32)  # the first slot again (320 bytes fit in its 200: grown)
    fourth = ring.take(25, np.float32)  # the second slot, large enough as it is
    assert fourth.ctypes.data == second.ctypes.data != third.ctypes.data
    assert (third.dtype, third.size, fourth.size) == (np.float32, 80, 25)
    assert ring.take(10, np.int16).ctypes.data == third.ctypes.data


def test_merge_task_is_idempotent(parents, tmp_path):
    from darwin.parents import Parents
    from tasks.merge import merge_child

    out = tmp_path / "child"
    pair = Parents(str(parents["father"].path), str(parents["mother"].path), "darwin-v5")
    merge_child.fn(pair, Genome.from_dict(V5), str(out))
    stamp = (out / "merge_report.json").stat().st_mtime_ns
    merge_child.fn(pair, Genome.from_dict(V5), str(out))
    assert (out / "merge_report.json").stat().st_mtime_ns == stamp


def test_v6_ratios_combine_static_and_probe_scores(parents, tmp_path):
    from darwin.mri import static_score, tensor_stats

    probe_a = {layer: 0.1 * (layer + 1) for layer in range(4)}
    probe_b = {layer: 0.05 for layer in range(4)}
    genome = v6(mri_trust=0.6)
    plan = plan_merge(parents["father"], parents["mother"], genome, "darwin-v6",
                      profiles=(ParentProfile(probe=probe_a), ParentProfile(probe=probe_b)))
    report = json.loads((merge_to_dir(plan, tmp_path / "child") / "merge_report.json").read_text())["tensors"]
    name = "model.layers.3.mlp.down_proj.weight"
    a, b = (static_score(tensor_stats(parents[p].read(name)), "v6") for p in ("father", "mother"))
    combined_a, combined_b = a * 0.4 + probe_a[3] * 0.6, b * 0.4 + probe_b[3] * 0.6
    row = report[name]
    assert row["mri_ratio"] == pytest.approx(combined_b / (combined_a + combined_b), rel=1e-6)
    assert row["final_ratio"] == pytest.approx(row["mri_ratio"] * 0.6 + row["genome_ratio"] * 0.4, rel=1e-6)
    assert (row["probe_father"], row["probe_mother"]) == (probe_a[3], probe_b[3])
    embed = report["model.embed_tokens.weight"]  # no layer: static score alone
    a, b = (static_score(tensor_stats(parents[p].read("model.embed_tokens.weight")), "v6") for p in ("father", "mother"))
    assert embed["mri_ratio"] == pytest.approx(b / (a + b), rel=1e-6) and "probe_father" not in embed


def test_dead_expert_is_transplanted_from_the_live_parent(pico_checkpoint, tmp_path):

    father, mother = (Checkpoint(pico_checkpoint("qwen3_moe", perturb=p)) for p in (1, 2))
    plan = plan_merge(father, mother, v6(), "darwin-v6", profiles=(ParentProfile(dead_experts={1: {2}}),
                                                                  ParentProfile(dead_experts={1: {0}, 2: {2}})))
    out = merge_to_dir(plan, tmp_path / "child")
    merged = json.loads((out / "merge_report.json").read_text())
    report = merged["tensors"]
    layer = "model.layers.{}.mlp.experts.{}.up_proj.weight"
    assert report[layer.format(1, 2)]["dead_expert_donors"] == {"2": "mother"}
    assert raw_bytes(out, layer.format(1, 2)) == raw_bytes(mother.path, layer.format(1, 2))
    assert report[layer.format(1, 0)]["dead_expert_donors"] == {"0": "father"}
    assert raw_bytes(out, layer.format(1, 0)) == raw_bytes(father.path, layer.format(1, 0))
    assert report[layer.format(2, 2)]["dead_expert_donors"] == {"2": "father"}
    assert "dead_expert_donors" not in report[layer.format(1, 1)]
    assert merged["dead_experts_from"] == {"1": {"2": "mother", "0": "father"}, "2": {"2": "father"}}


def test_a_dead_experts_slice_of_a_fused_tensor_is_the_live_parents(pico_checkpoint, tmp_path):
    """Gemma 4 (and Qwen3.5-MoE releases) store the routed experts fused, [E, ...] in one tensor: the dead expert's
    slice comes from the live parent byte for byte, the other experts' slices are merged."""

    father, mother = (Checkpoint(pico_checkpoint("gemma4_moe_text", perturb=p)) for p in (1, 2))
    fused = "model.layers.1.experts.gate_up_proj"
    assert len(father.tensors[fused].shape) == 3
    plan = plan_merge(father, mother, v6(), "darwin-v6",
                      profiles=(ParentProfile(), ParentProfile(dead_experts={1: {2}})))
    out = Checkpoint(merge_to_dir(plan, tmp_path / "child"))
    merged = json.loads((out.path / "merge_report.json").read_text())
    assert merged["tensors"][fused]["dead_expert_donors"] == {"2": "father"}
    assert merged["dead_experts_from"] == {"1": {"2": "father"}}
    child, a, b = out.read_array(fused), father.read_array(fused), mother.read_array(fused)
    assert np.array_equal(child[2], a[2])
    for expert in (0, 1, 3):
        assert not np.array_equal(child[expert], a[expert]) and not np.array_equal(child[expert], b[expert])
    # and the father's mapped bytes were not touched
    assert np.array_equal(Checkpoint(father.path).read_array(fused), a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, "mixed"])
@pytest.mark.parametrize(("method", "blend"), [("darwin-v5", 1.0), ("darwin-v6", 1.0), ("darwin-v6", 0.7),
                                               ("dare-ties", 1.0), ("dare-ties", 0.7)])  # a v5 genome has no blend
@pytest.mark.parametrize("densities", [(0.8, 0.6), (0.0, 1.0), (1.0, 0.0)])
def test_fused_cpu_kernel_gives_the_torch_path_bytes(pico_checkpoint, dtype, method, densities, blend, monkeypatch):
    """CUDA runs the torch forms; CPU runs the C kernel: both must write the same bytes. Parents of one dtype go
    straight through the kernel in their own dtype (no torch conversion at all), with the V6 blend too; parents of
    different dtypes (a bf16 father, a float16 mother and a float32 base) through float32 chunks."""

    if methods._kernels is None:
        pytest.skip("the C kernel was not built (no compiler): only the torch path exists")
    dtypes = {"base": torch.float32, "father": torch.bfloat16, "mother": torch.float16} if dtype == "mixed" else {}
    parents = {role: Checkpoint(pico_checkpoint("qwen3_5_text", perturb=perturb, dtype=dtypes.get(role, dtype)))
               for role, perturb in (("base", None), ("father", 1), ("mother", 2))}
    genes = {"density_a": densities[0], "density_b": densities[1]}
    genome = v5(**genes) if method == "darwin-v5" else v6(**genes, merge_method_weight=blend)
    plan = plan_merge(parents["father"], parents["mother"], genome, method, base=parents["base"])
    name = "model.layers.2.mlp.gate_proj.weight"
    a, b, c = (parents[role].read_array(name) for role in ("father", "mother", "base"))
    tp = next(t for t in plan.tensors if t.name == name)
    monkeypatch.setattr(masks, "CHUNK", 1000)  # several chunks, in parallel threads
    monkeypatch.setattr(engine, "DIRECT_CHUNK", 1000)
    if dtype != "mixed":
        with monkeypatch.context() as direct:
            direct.setattr(engine, "to_torch", None)  # any torch conversion fails
            fused = engine._merge_values(plan, tp, a, b, c, 0.37, "cpu")
    else:
        fused = engine._merge_values(plan, tp, a, b, c, 0.37, "cpu")
    monkeypatch.setattr(methods, "_kernels", None)
    reference = engine._merge_values(plan, tp, a, b, c, 0.37, "cpu")
    assert fused.dtype == a.dtype and np.array_equal(fused, reference)
    if densities == (0.8, 0.6):  # both parents contribute: the comparison is not between two copies of the father
        assert not np.array_equal(fused, a) and not np.array_equal(fused, b)


@pytest.mark.skipif(methods._kernels is None, reason="the C kernel is not built")
@pytest.mark.parametrize("code", ["F16", "BF16"])
def test_kernel_rounds_extreme_values_as_torch(code):
    """Parents with subnormal, huge, infinite and NaN values: the kernel's bits equal torch's forms stored by torch
    (dare-ties' rescale by 1/density overflows the largest values to inf, inf - inf is NaN), and a NaN is a NaN
    (its bits are not torch's either: its bf16 conversion stores 0xFFFF in vector lanes, 0x7FC0 in the tail)."""
    dtype = torch_dtype(code)
    g = torch.Generator().manual_seed(0)
    scales = (1e-7, 1e-5, 1e-2, 1.0, 3e3, 6e4) if code == "F16" else (1e-40, 1e-20, 1.0, 1e20, 3e38)
    def parent():
        values = torch.cat([torch.randn(20_000, generator=g) * s for s in scales])
        values[::997] = float("inf")
        values[::1009] = -float("inf")
        values[::1013] = float("nan")
        return values.to(dtype)
    a, b, c = parent(), parent(), parent()
    start, seed, r, density_a, density_b = 12_345, 99, 0.37, 0.3, 0.6
    keep_a, keep_b = masks.keep_masks(seed, start, start + a.numel(), density_a, density_b, "cpu")
    fa, fb, fc = a.float(), b.float(), c.float()
    for method, blend in (("darwin-v6", 1.0), ("darwin-v6", 0.7), ("dare-ties", 1.0), ("dare-ties", 0.7)):
        spec = methods.METHODS[method]
        form = methods.torch_merge(spec, fa, fb, fc, keep_a, keep_b, r, density_a, density_b, blend)
        expected = to_raw(form.to(dtype)).view(np.uint16)
        out = np.empty_like(expected)
        spec.kernel(out, *(to_raw(x).view(np.uint16) for x in (a, b, c)), start, seed, r, density_a, density_b, blend,
                    methods.KERNEL_DTYPES[code])
        nan = np.isnan(form.numpy())
        assert np.isinf(form).any() and nan.any()
        assert np.array_equal(np.isnan(to_torch(out, code).float().numpy()), nan), (method, blend)
        assert np.array_equal(out[~nan], expected[~nan]), (method, blend)


def test_dare_ties_spans_father_task_arithmetic_and_mother(parents, tmp_path):
    """Density 1, mri_trust 0: r = 0 is the father, r = 0.5 the TIES sum of both task vectors, r = 1 the mother."""
    def child(ratio):
        genome = v6(global_ratio=ratio, attn_ratio=ratio, ffn_ratio=ratio, embed_ratio=ratio, density_a=1.0,
                    density_b=1.0)
        plan = plan_merge(parents["father"], parents["mother"], genome, "dare-ties", base=parents["base"])
        return merge_to_dir(plan, tmp_path / f"r{ratio}")

    name = "model.layers.1.mlp.down_proj.weight"
    a, b, c = (parents[k].read(name).float() for k in ("father", "mother", "base"))
    assert torch.equal(Checkpoint(child(0.0)).read(name), parents["father"].read(name))
    assert torch.equal(Checkpoint(child(1.0)).read(name), parents["mother"].read(name))
    tv_a, tv_b = a - c, b - c
    sign = torch.where(tv_a + tv_b >= 0, 1.0, -1.0)
    expected = c + torch.where(torch.sign(tv_a) == sign, tv_a, 0.0) + torch.where(torch.sign(tv_b) == sign, tv_b, 0.0)
    assert torch.equal(Checkpoint(child(0.5)).read(name), expected.to(torch.bfloat16))


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_5_moe_text"])
def test_phase2_places_experts_as_transformers_loads_them(pico_checkpoint, tmp_path, family):
    """Per-expert checkpoints (Qwen3-MoE, and Qwen3.5-MoE as transformers saves it) load fused into the model, through
    transformers' own weight converters: the model Phase 2 scores equals the child written to disk, loaded by
    transformers. (The pico Gemma 4 does not reload through from_pretrained: its saved config loses the global
    head size of its full-attention layers.)"""
    from transformers import AutoModelForCausalLM

    from darwin.merge import merge_into_model

    father, mother = (Checkpoint(pico_checkpoint(family, perturb=p)) for p in (1, 2))
    plan = plan_merge(father, mother, v6(), "darwin-v6")
    model = AutoModelForCausalLM.from_pretrained(father.path, dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_into_model(plan, model)
    child = AutoModelForCausalLM.from_pretrained(merge_to_dir(plan, tmp_path / "child"), dtype=torch.bfloat16)
    expected = child.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    fused = [k for k in before if "experts" in k and before[k].dim() == 3]
    assert fused and all(not torch.equal(model.state_dict()[k], before[k]) for k in fused)


def test_the_merge_reports_progress_tensor_by_tensor(parents, tmp_path):
    steps = []
    out = Checkpoint(merge_to_dir(plan_merge(parents["father"], parents["mother"], Genome.from_dict(V5), "darwin-v5"),
                                  tmp_path / "child", progress=lambda done, total: steps.append((done, total))))
    assert len(steps) == len(out.tensors) and steps[-1] == (out.nbytes, out.nbytes)
    assert all(a[0] < b[0] for a, b in zip(steps, steps[1:]))


@pytest.fixture(scope="module")
def moe_layouts(tmp_path_factory):
    """A Qwen3.5-MoE base, father and mother, each both as the hub stores it (fused experts, written with
    safetensors) and as transformers saves a freshly built one (per expert)."""
    import pico

    root = tmp_path_factory.mktemp("moe-layouts")
    paths = {}
    for role, perturb in (("base", None), ("father", 1), ("mother", 2)):
        model = pico.build("qwen3_5_moe_text")
        if perturb is not None:
            pico.perturbed(model, perturb)
        tensors = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        paths[role, "fused"] = pico.write_release(root / f"{role}-fused", tensors, model.config, shards=2)
        paths[role, "per_expert"] = pico.save(model, root / f"{role}-per-expert")
    for (role, layout), path in paths.items():
        assert (layout == "fused") == any(n.endswith("experts.gate_up_proj") for n in Checkpoint(path).tensors)
    return paths


@pytest.mark.parametrize("method", ["darwin-v6", "dare-ties"])
@pytest.mark.parametrize("father_layout", ["fused", "per_expert"])
def test_parents_with_other_expert_layouts_merge_expert_by_expert(moe_layouts, tmp_path, method, father_layout):
    """A mother (and base) with the other expert layout merges expert by expert into the father's layout: the
    child is byte for byte the child of the same parents both in the father's layout, and holds no tensor of the
    other layout; a dead expert of the father's is the mother's bytes; Phase 2's in-memory merge equals the child
    loaded by transformers. `--strict` refuses the difference."""
    from transformers import AutoModelForCausalLM

    from darwin.merge import merge_into_model

    other = "per_expert" if father_layout == "fused" else "fused"
    father = Checkpoint(moe_layouts["father", father_layout])
    routed = ParentProfile(dead_experts={1: {2}})
    children = {}
    for layout in (father_layout, other):
        mother, base = (Checkpoint(moe_layouts[role, layout]) for role in ("mother", "base"))
        plan = plan_merge(father, mother, v6(), method, base=base, profiles=(routed, ParentProfile()))
        children[layout] = merge_to_dir(plan, tmp_path / layout)
    assert all_bytes(children[other]) == all_bytes(children[father_layout])
    child = Checkpoint(children[other])
    assert set(child.tensors) == set(father.tensors)
    report = json.loads((children[other] / "merge_report.json").read_text())
    assert report["experts_relaid"] == ["mother", "base"] and report["dead_experts_from"] == {"1": {"2": "mother"}}
    mother = Checkpoint(moe_layouts["mother", father_layout])
    dead = [n for n in father.tensors if n.startswith("model.layers.1.mlp.experts.")
            and (".2." in n or n.endswith("_proj"))]
    for name in dead:
        piece, donor = child.read_array(name), mother.read_array(name)
        assert np.array_equal(piece[2] if piece.ndim == 3 else piece, donor[2] if donor.ndim == 3 else donor), name
    plan = plan_merge(father, Checkpoint(moe_layouts["mother", other]), v6(), method,
                      base=Checkpoint(moe_layouts["base", other]), profiles=(routed, ParentProfile()))
    model = AutoModelForCausalLM.from_pretrained(father.path, dtype=torch.bfloat16)
    merge_into_model(plan, model)
    expected = AutoModelForCausalLM.from_pretrained(children[other], dtype=torch.bfloat16).state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    with pytest.raises(DarwinError, match="only in father"):
        plan_merge(father, Checkpoint(moe_layouts["mother", other]), v6(), method,
                   base=Checkpoint(moe_layouts["base", other]), strict=True)


@pytest.mark.parametrize("method", ["darwin-v6", "dare-ties"])
def test_large_fused_experts_stream_slice_by_slice_into_the_same_bytes(pico_checkpoint, tmp_path, monkeypatch,
                                                                       method):
    """A fused expert tensor over STREAM_BYTES is merged and written one expert slice at a time (its memory a
    slice's): the child is byte for byte the one merged whole, the dead expert's slice the live parent's."""

    father, mother, base = (Checkpoint(pico_checkpoint("gemma4_moe_text", perturb=p)) for p in (1, 2, None))
    routed = ParentProfile(dead_experts={1: {2}})
    children, slice_sizes = {}, []
    real = engine.merge_slices

    def watched(plan, tp, a, *args):
        pieces, row = real(plan, tp, a, *args)
        slice_sizes.append(a[0].nbytes)
        return pieces, row

    for label, threshold in (("whole", 1 << 40), ("sliced", 0)):
        monkeypatch.setattr(engine, "STREAM_BYTES", threshold)
        monkeypatch.setattr(engine, "merge_slices", watched)
        plan = plan_merge(father, mother, v6(merge_method_weight=0.7), method, base=base,
                          profiles=(ParentProfile(), routed))
        children[label] = merge_to_dir(plan, tmp_path / label)
    fused = [n for n, info in father.tensors.items() if len(info.shape) == 3 and ".experts." in n]
    assert len(slice_sizes) == len(fused) > 0  # the sliced run alone streamed, every fused tensor
    assert all_bytes(children["sliced"]) == all_bytes(children["whole"])
    report = json.loads((children["sliced"] / "merge_report.json").read_text())
    assert report["dead_experts_from"] == {"1": {"2": "father"}}
    assert report == {**json.loads((children["whole"] / "merge_report.json").read_text()),
                      "seconds": report["seconds"]}


def test_a_method_is_one_record_in_the_registry(parents, tmp_path, monkeypatch):
    """A new merge method is one record in METHODS, its torch form alone (no C kernel): the run config and
    `darwin merge --method` take it, the CPU runs its form on float32 chunks, the report names it."""
    from darwin.config import parse_config
    from flows.cli import main

    def midpoint(a, b, base, keep_a, keep_b, r, density_a, density_b):
        return (a + b) * 0.5

    monkeypatch.setitem(methods.METHODS, "midpoint", methods.Method(midpoint, None, needs_base=False, genome=None))
    config = parse_config({"father": "f", "mother": "m", "method": "midpoint", "genome": "v6"})
    assert (config.method, config.genome) == ("midpoint", "v6")
    genome = tmp_path / "genome.json"
    genome.write_text(json.dumps(V5))
    assert main(["merge", "--father", str(parents["father"].path), "--mother", str(parents["mother"].path),
                 "--genome", str(genome), "--method", "midpoint", "--out", str(tmp_path / "child")]) == 0
    report = json.loads((tmp_path / "child" / "merge_report.json").read_text())
    assert report["method"] == "midpoint"
    merged = [name for name, row in report["tensors"].items() if row.get("transplant") is None
              and not row.get("carried") and row.get("final_ratio")]
    child = Checkpoint(tmp_path / "child")
    for name in merged[:3]:
        expected = ((parents["father"].read(name).float() + parents["mother"].read(name).float()) * 0.5)
        assert torch.equal(child.read(name), expected.to(child.read(name).dtype)), name
    with pytest.raises(DarwinError, match="unknown method 'mean'"):
        parse_config({"father": "f", "mother": "m", "method": "mean"})
