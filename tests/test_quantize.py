"""Release quantization on tiny Qwen3.5 (vision + MTP) and Qwen3.5-MoE checkpoints, on CPU, with the real
ModelOpt, compressed-tensors, transformers and lm-eval; the written NVFP4 tensors are decoded by a decoder of
this file's own (not darwin's)."""

import fnmatch
import json
import shutil

import pico
import picotok
import pytest
import torch
from safetensors import safe_open

from darwin.checkpoint import Checkpoint, CheckpointWriter
from darwin.errors import DarwinError
from darwin.quantize import quantize
from darwin.quantize.calibration import Calibration, calibration_set
from tasks.policy import gpu_tag

FAMILIES = ("qwen3_5", "qwen3_5_moe_text")
SCHEMES = ("mfp4", "nvfp4a16")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# (packed weight, per-tensor scale, scale is a divisor) of each format
FORMAT = {"mfp4": ("weight", "weight_scale_2", False), "nvfp4a16": ("weight_packed", "weight_global_scale", True)}
# what each scheme quantizes, by kind; everything else must come out bit-identical
CALIBRATION = Calibration(("The capital of France is Paris.", "def add(a, b):\n    return a + b"), "two prompts")
QUANTIZED_KINDS = {"mfp4": {"mlp", "expert", "shared_expert"}, "nvfp4a16": {"attn", "mlp", "expert", "shared_expert"}}


def decode(packed: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor, divide: bool):
    """NVFP4 by the book: a byte holds element 2i in its low nibble and 2i+1 in its high nibble; a nibble is
    sign (bit 3) and an E2M1 magnitude index (bits 0-2); 16 consecutive inputs share one FP8 E4M3 scale."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2).long()
    values = E2M1[codes & 7] * (1 - 2 * ((codes >> 3) & 1)).float()
    scale = block_scale.float() / tensor_scale.float() if divide else block_scale.float() * tensor_scale.float()
    return (values.unflatten(-1, (-1, 16)) * scale.unsqueeze(-1)).flatten(-2)


def read_all(path):
    tensors = {}
    for shard in path.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118 (not a dict)
    return tensors


@pytest.fixture(scope="module")
def source(pico_checkpoint, tmp_path_factory):
    """The pico checkpoints with a tokenizer beside them (mfp4 calibrates on text); "qwen3_5_moe" is the MoE
    release as the hub stores it (fused routed experts, per-expert MTP experts, float32 A_log and norms)."""
    built = {}

    def make(family):
        if family not in built:
            path = tmp_path_factory.mktemp(f"src-{family}") / family
            if family == "qwen3_5_moe":
                pico.moe_release(path)
            else:
                shutil.copytree(pico_checkpoint(family), path)
            built[family] = picotok.save_beside(path)
        return built[family]

    return make


@pytest.fixture(scope="module")
def quantized(source, tmp_path_factory):
    built = {}

    def make(family, scheme):
        if (family, scheme) not in built:
            out = tmp_path_factory.mktemp(f"{family}-{scheme}") / "out"
            # two short prompts: a bf16 MoE forward on CPU costs ~0.7 s a prompt, the default set has 25
            calibration = CALIBRATION if scheme == "mfp4" else None
            built[family, scheme] = quantize(source(family), scheme, out, calibration=calibration, device="cpu")
        return built[family, scheme]

    return make


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_written_nvfp4_decodes_close_to_source(family, scheme, source, quantized):
    src, out = read_all(source(family)), read_all(quantized(family, scheme))
    packed_name, scale_name, divide = FORMAT[scheme]
    modules = [n.removesuffix("." + packed_name) for n, t in out.items()
               if n.endswith("." + packed_name) and t.dtype == torch.uint8]
    assert modules
    report = json.loads((quantized(family, scheme) / "roundtrip.json").read_text())
    by_name = {row["name"]: row for row in report["tensors"]}
    err_sq = ref_sq = 0.0
    for module in modules:
        packed, block_scale, tensor_scale = (out[f"{module}.{p}"] for p in (packed_name, "weight_scale", scale_name))
        assert block_scale.dtype == torch.float8_e4m3fn and tensor_scale.dtype == torch.float32
        original = src[f"{module}.weight"].float()
        assert packed.shape == (original.shape[0], original.shape[1] // 2)
        assert block_scale.shape == (original.shape[0], original.shape[1] // 16)
        decoded = decode(packed, block_scale, tensor_scale, divide)
        rel = float((decoded - original).norm() / original.norm())
        assert rel < 0.15, module
        # darwin's report, decoded from the same files by its own code, agrees with this decoder
        assert by_name[f"{module}.weight"]["relative_frobenius"] == pytest.approx(rel, rel=1e-4)
        assert by_name[f"{module}.weight"]["max_abs_error"] == pytest.approx(
            float((decoded - original).abs().max()), rel=1e-4)
        err_sq, ref_sq = err_sq + float((decoded - original).pow(2).sum()), ref_sq + float(original.pow(2).sum())
    assert report["overall"]["relative_frobenius"] == pytest.approx((err_sq / ref_sq) ** 0.5, rel=1e-4)
    assert report["overall"]["bytes_after"] < report["overall"]["bytes_before"]
    if scheme == "mfp4":
        assert all(out[f"{m}.input_scale"].dtype == torch.float32 for m in modules)


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_moe"])
def test_nvfp4a16_parts_vllm_fuses_share_one_global_scale(source, tmp_path, family):
    """vLLM runs q/k/v and gate/up (each expert's gate/up too) as one kernel with ONE global scale, the largest of
    the parts'. A k_proj and an up_proj four times larger than their partners: the parts must carry the same scale,
    or vLLM decodes the others with the largest one's."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "skewed"
    shutil.copytree(source(family), path)
    for shard in path.glob("*.safetensors"):
        tensors = load_file(shard)
        save_file({name: t * 4 if (".self_attn.k_proj." in name or ".up_proj." in name) else t
                   for name, t in tensors.items()}, shard, metadata={"format": "pt"})
    out = read_all(quantize(path, "nvfp4a16", tmp_path / "out"))
    src = read_all(path)
    groups = {}
    for name, scale in out.items():
        if name.endswith(".weight_global_scale"):
            module = name.removesuffix(".weight_global_scale")
            prefix, part = module.rsplit(".", 1)
            kernel = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
            groups.setdefault((prefix, kernel.get(part, part)), {})[part] = scale
    fused = {key: parts for key, parts in groups.items() if len(parts) > 1}
    assert any(key[1] == "qkv" for key in fused) and any(key[1] == "gate_up" for key in fused)
    if family == "qwen3_moe":  # one gate/up kernel per expert
        assert any(".experts." in prefix for prefix, kernel in fused if kernel == "gate_up")
    for (prefix, _), parts in fused.items():
        served = max(parts.values(), key=float)  # what vLLM applies to the fused kernel
        for part, scale in parts.items():
            assert torch.equal(scale, served), (prefix, part)
            module = f"{prefix}.{part}"
            decoded = decode(out[f"{module}.weight_packed"], out[f"{module}.weight_scale"], served, True)
            original = src[f"{module}.weight"].float()
            assert float((decoded - original).norm() / original.norm()) < 0.15, module


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_schemes_linears_are_quantized_and_the_rest_is_bit_identical(family, scheme, source, quantized):
    ckpt = Checkpoint(source(family))
    src, out = read_all(ckpt.path), read_all(quantized(family, scheme))
    packed_name = FORMAT[scheme][0]
    quantized_sources = {n.removesuffix("." + packed_name) + ".weight" for n, t in out.items()
                         if n.endswith("." + packed_name) and t.dtype == torch.uint8}
    expected = {n for n, t in src.items()
                if ckpt.kind(n)[0] in QUANTIZED_KINDS[scheme] and n.endswith(".weight") and t.ndim == 2}
    assert quantized_sources == expected
    kept = [n for n in src if n not in expected]
    kinds = {ckpt.kind(n)[0] for n in kept}
    assert {"linear_attn", "embed", "lm_head", "norm"} <= kinds
    assert ("mtp" in kinds and "vision" in kinds) == (family == "qwen3_5")
    assert ("router" in kinds) == (family == "qwen3_5_moe_text")
    if scheme == "nvfp4a16":
        assert all(src[n].ndim == 1 for n in kept if ckpt.kind(n)[0] == "attn")  # q_norm / k_norm only
    for name in kept:
        assert out[name].dtype == src[name].dtype and torch.equal(out[name].view(torch.uint8),
                                                                  src[name].view(torch.uint8)), name
    report = json.loads((quantized(family, scheme) / "roundtrip.json").read_text())
    assert sorted(report["kept"]) == sorted(kept) and report["kept_identical"] and not report["missing"]


@pytest.mark.parametrize("family", [*FAMILIES, "qwen3_5_moe"])
def test_mfp4_config_excludes_exactly_the_bf16_modules(family, source, quantized):
    out = quantized(family, "mfp4")
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert hf_quant["quant_algo"] == "NVFP4" and hf_quant["group_size"] == 16
    assert config["quant_method"] == "modelopt" and sorted(config["ignore"]) == sorted(hf_quant["exclude_modules"])
    tensors = read_all(out)
    quantized_modules = {n.removesuffix(".weight") for n, t in tensors.items() if n.endswith(".weight")
                         and t.dtype == torch.uint8}
    kept_modules = {n.removesuffix(".weight") for n, t in tensors.items() if n.endswith(".weight")
                    and t.ndim >= 2 and t.dtype == torch.bfloat16}

    def excluded(module):  # vLLM's modelopt_fp4: fnmatch of the module's name against exclude_modules
        return any(fnmatch.fnmatch(module, pattern) for pattern in hf_quant["exclude_modules"])

    assert not [m for m in quantized_modules if excluded(m)]
    # a kept matrix that no pattern names would be read by vLLM as NVFP4: every one is named
    assert not [m for m in kept_modules if not excluded(m) and "embed" not in m]
    assert any(m.startswith("mtp.") for m in kept_modules) == (family in ("qwen3_5", "qwen3_5_moe"))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fused_experts_are_released_per_expert_with_scales_of_their_own(scheme, source, quantized):
    """The MoE release's fused experts come out per expert, `mlp.experts.{e}.gate_proj|up_proj|down_proj`: the
    names vLLM's MoE loader reads quantized experts from (ModelOpt's own export of fused experts). Each part decodes
    back to its slice of the fused tensor (gate: rows [0, I) of gate_up_proj[e], up: [I, 2I)) within the dense
    release's bound; each expert has its own per-tensor scale, shared by its gate and up (vLLM applies the gate's
    to both); routers, the shared expert's gate, vision and the per-expert MTP experts stay as they were, float32
    A_log and norms included."""
    ckpt = Checkpoint(source("qwen3_5_moe"))
    src, out = read_all(ckpt.path), read_all(quantized("qwen3_5_moe", scheme))
    packed_name, scale_name, divide = FORMAT[scheme]
    fused = [n for n in src if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))]
    assert len(fused) == 8 and not [n for n in out if n in fused]
    for name in fused:
        prefix, part = name.rsplit(".", 1)
        experts, rows = src[name].shape[0], src[name].shape[1]
        parts = {"down_proj": slice(0, rows)} if part == "down_proj" else {
            "gate_proj": slice(0, rows // 2), "up_proj": slice(rows // 2, rows)}
        scales = []
        for e in range(experts):
            for linear, rows_of in parts.items():
                module = f"{prefix}.{e}.{linear}"
                decoded = decode(out[f"{module}.{packed_name}"], out[f"{module}.weight_scale"],
                                 out[f"{module}.{scale_name}"], divide)
                original = src[name][e, rows_of].float()
                assert decoded.shape == original.shape
                assert float((decoded - original).norm() / original.norm()) < 0.15, module
            # the expert's own scale, from the largest magnitude of its slice (gate and up together)
            scale = out[f"{prefix}.{e}.{next(iter(parts))}.{scale_name}"]
            amax = src[name][e].float().abs().max()
            assert float(scale) == pytest.approx(float(6 * 448 / amax if divide else amax / (6 * 448)), rel=1e-5)
            if part == "gate_up_proj":
                assert torch.equal(out[f"{prefix}.{e}.gate_proj.{scale_name}"], out[f"{prefix}.{e}.up_proj.{scale_name}"])
            scales.append(float(scale))
        assert len(set(scales)) > 1, name  # per expert, not one for the tensor
    kept = [n for n in src if n in out and n.removesuffix(".weight") + ".weight_scale" not in out]
    for must in ("mtp.layers.0.mlp.experts.0.gate_proj.weight", "model.language_model.layers.0.mlp.gate.weight",
                 "model.language_model.layers.0.mlp.shared_expert_gate.weight",
                 "model.language_model.layers.0.linear_attn.A_log"):
        assert must in kept, must
    assert any(n.startswith("model.visual.") for n in kept)
    assert src["model.language_model.layers.0.linear_attn.A_log"].dtype == torch.float32
    for name in kept:
        assert out[name].dtype == src[name].dtype and torch.equal(out[name].view(torch.uint8),
                                                                  src[name].view(torch.uint8)), name
    report = json.loads((quantized("qwen3_5_moe", scheme) / "roundtrip.json").read_text())
    rows = {row["name"]: row for row in report["tensors"]}
    assert rows["model.language_model.layers.1.mlp.experts.3.up_proj.weight"]["slice_of"] == \
        "model.language_model.layers.1.mlp.experts.gate_up_proj[3, 32:64]"
    assert report["kept_identical"] and not report["missing"]
    if scheme == "nvfp4a16":  # no ignore entry names a routed expert: vLLM quantizes all of them
        ignore = json.loads((quantized("qwen3_5_moe", scheme) / "config.json").read_text())["quantization_config"][
            "ignore"]
        assert not [p for p in ignore if ".experts." in p and "mtp" not in p]
        assert any("mtp" in p and "experts" in p for p in ignore)


def test_mfp4_fake_quant_model_runs_on_cpu_and_matches_the_export(source, quantized):
    from darwin.quantize.mfp4 import calibrate

    model, tokenizer = calibrate(Checkpoint(source("qwen3_5")), CALIBRATION, "cpu")
    with torch.no_grad():  # ModelOpt's own NVFP4 fake-quant kernel asserts CUDA; darwin's torch backend runs here
        logits = model(**tokenizer("The sky is blue", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    written = read_all(quantized("qwen3_5", "mfp4"))
    for layer in (0, 3):
        linear = model.model.language_model.layers[layer].mlp.down_proj
        with torch.no_grad():
            fake = linear.weight_quantizer(linear.weight).float()
        name = f"model.language_model.layers.{layer}.mlp.down_proj"
        exported = decode(written[f"{name}.weight"], written[f"{name}.weight_scale"],
                          written[f"{name}.weight_scale_2"], False)
        assert not torch.equal(fake, linear.weight.float())
        torch.testing.assert_close(fake, exported, rtol=1e-2, atol=1e-4)


def test_nvfp4a16_loads_in_transformers_and_evaluates_with_lm_eval(source, quantized, tmp_path):
    import transformers

    from darwin.evaluate import evaluate, multiple_choice_task_file

    out = quantized("qwen3_5", "nvfp4a16")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "nvfp4-pack-quantized"
    # as darwin's probes and evaluation load a multimodal Qwen3.5: its text model, under renamed modules
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer("The sky is blue").input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    written, src = read_all(out), read_all(source("qwen3_5"))
    for name, param in model.named_parameters():
        stored = "model.language_model." + name.removeprefix("model.") if name.startswith("model.") else name
        if f"{stored.removesuffix('.weight')}.weight_packed" in written:
            module = stored.removesuffix(".weight")
            expected = decode(written[f"{module}.weight_packed"], written[f"{module}.weight_scale"],
                              written[f"{module}.weight_global_scale"], True)
            torch.testing.assert_close(param.float(), expected, rtol=1e-2, atol=1e-3)
        elif name.endswith("weight"):
            assert torch.equal(param, src[stored]), name  # kept BF16, not re-initialised
    rows = [("Which is a fruit", ["banana", "rock", "iron", "seven"]), ("What barks", ["a dog", "a fish", "a tree",
            "a snail"]), ("What melts ice", ["heat", "wind", "dark", "salt"]), ("Where do fish live", ["water",
            "moon", "sand", "trees"]), ("What do bees make", ["honey", "bricks", "steel", "glass"])]
    lines = [json.dumps({"id": f"q{i}", "question": q, "choices": {"text": c, "label": list("ABCD")},
                         "answerKey": "A"}) for i, (q, c) in enumerate(rows)]
    (tmp_path / "toy.jsonl").write_text("\n".join(lines) + "\n")
    task = multiple_choice_task_file("toy_quantized", {"test": tmp_path / "toy.jsonl"}, tmp_path / "tasks")
    result = evaluate(model, tokenizer, [str(task)], batch_size=5)
    assert len(result.per_question["toy_quantized"]) == 5 and 0.0 <= result.fitness <= 1.0


def test_bad_inputs_are_one_clear_error(source, quantized, tmp_path, capsys):
    from flows.cli import main

    with pytest.raises(DarwinError, match="unknown quantization scheme 'int3'"):
        quantize(source("qwen3_5"), "int3", tmp_path / "a")
    for scheme in SCHEMES:
        with pytest.raises(DarwinError, match="already quantized"):
            quantize(quantized("qwen3_5_moe_text", "nvfp4a16"), scheme, tmp_path / f"b-{scheme}")
    attention_only = tmp_path / "attention-only"
    with CheckpointWriter(attention_only) as writer:
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
            writer.add(name, torch.zeros(32, 32, dtype=torch.bfloat16))
        writer.write_text("config.json", json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    for scheme in SCHEMES:
        with pytest.raises(DarwinError, match="no MLP or expert tensors"):
            quantize(attention_only, scheme, tmp_path / f"c-{scheme}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention-only"]  # nothing written, no temp dirs left
    with pytest.raises(SystemExit) as refused:  # an unknown scheme is argparse's usage error
        main(["quantize", str(source("qwen3_5")), "--scheme", "int3", "--out", str(tmp_path / "d")])
    assert refused.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err
    assert main(["quantize", str(attention_only), "--scheme", "mfp4", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no MLP" in err[0]


def quantize_task_tags(name: str) -> set[str]:
    """The tags of the task runs named `name` on the test's Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[name])))
    assert runs
    return {tag for run in runs for tag in run.tags}


def test_mfp4_calibrates_on_the_set_it_is_given(source, quantized, pico_family, tmp_path, capsys, prefect_api):
    """A task's documents as calibration texts, counted and cut as asked: the activation scales move with them,
    the weights do not, and roundtrip.json says what the set was."""
    from flows.cli import main

    task = str(pico_family["task"])
    texts = calibration_set(task, samples=3, seq_len=8).texts
    assert texts == ("Question: What is 0 plus 0?\nAnswer: 0", "Question: What is 1 plus 1?\nAnswer: 3",
                     "Question: What is 2 plus 2?\nAnswer: 2")  # validation docs, prompt and right answer
    assert len(calibration_set().texts) == 25 and calibration_set().source == "probe prompts"
    out = tmp_path / "task-calibrated"
    assert main(["quantize", str(source("qwen3_5")), "--scheme", "mfp4", "--calibration", task,
                 "--calibration-samples", "3", "--calibration-seq-len", "8", "--out", str(out)]) == 0
    report = json.loads((out / "roundtrip.json").read_text())
    assert report["calibration"] == {"source": task, "samples": 3, "seq_len": 8}
    ours, theirs = read_all(out), read_all(quantized("qwen3_5", "mfp4"))
    name = "model.language_model.layers.0.mlp.down_proj"
    assert torch.equal(ours[f"{name}.weight"], theirs[f"{name}.weight"])
    assert not torch.equal(ours[f"{name}.input_scale"], theirs[f"{name}.input_scale"])
    assert main(["quantize", str(source("qwen3_5")), "--scheme", "nvfp4a16", "--calibration", task, "--out",
                 str(tmp_path / "refused")]) == 2
    assert "calibration is for mfp4" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert gpu_tag() in quantize_task_tags("quantize-mfp4")  # device auto: calibration may run on a GPU


def test_quantize_command_runs_the_release_flow(source, tmp_path, prefect_api):
    from prefect.artifacts import Artifact

    from flows.cli import main

    out = tmp_path / "moe-nvfp4a16"
    assert main(["quantize", str(source("qwen3_5_moe_text")), "--scheme", "nvfp4a16", "--out", str(out)]) == 0
    report = json.loads((out / "roundtrip.json").read_text())
    assert report["scheme"] == "nvfp4a16" and report["overall"]["relative_frobenius"] < 0.15
    assert not any(tag.startswith("gpu") for tag in quantize_task_tags("quantize-nvfp4a16"))  # CPU only: no slot
    artifact = Artifact.get("roundtrip-nvfp4a16")
    assert artifact is not None and len(artifact.data if isinstance(artifact.data, list) else json.loads(
        artifact.data)) == len(report["tensors"]) + 1
    # a finished release is not redone: the rerun returns the same output untouched
    stamp = (out / "roundtrip.json").stat().st_mtime_ns
    assert main(["quantize", str(source("qwen3_5_moe_text")), "--scheme", "nvfp4a16", "--out", str(out)]) == 0
    assert (out / "roundtrip.json").stat().st_mtime_ns == stamp
