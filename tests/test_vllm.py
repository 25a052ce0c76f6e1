"""The real client: vLLM's CPU build (its own venv, tests/vllm/make_venv.sh) loads darwin's bf16 child of a tiny Llama
and its mfp4 and nvfp4a16 releases with vLLM's own weight loading, and serves what darwin verified: the child's
greedy tokens are transformers', and each release's log-probabilities are those of the child with the release's
weights decoded by this suite's own decoder (vLLM's NVFP4 kernels on CPU: tests/vllm/plugin)."""

import json
import os
import subprocess
from pathlib import Path

import pico
import picotok
import pytest
import torch
import transformers as tf
from test_quantize import E2M1, decode, read_all

from darwin.checkpoint import Checkpoint
from darwin.genome import Genome
from darwin.merge import merge_to_dir, plan_merge
from darwin.quantize import quantize
from darwin.quantize.calibration import Calibration

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "tests" / "vllm" / "client.py"
PROMPTS = [[(7 * i + 13 * j) % 300 + 3 for j in range(20)] for i in range(4)]

V5 = {"global_ratio": 0.5, "attn_ratio": 0.45, "ffn_ratio": 0.55, "embed_ratio": 0.5, "density_a": 0.9,
      "density_b": 0.9}


@pytest.fixture(scope="session")
def vllm_python():
    python = Path(os.environ.get("DARWIN_VLLM_VENV", ROOT / ".venv-vllm")) / "bin" / "python"
    if not python.exists():
        message = f"vLLM's CPU venv is not built ({python}): bash tests/vllm/make_venv.sh"
        if os.environ.get("CI"):
            pytest.fail(message)  # .ci/run builds it: CI must not skip the real client
        pytest.skip(message)
    return python


def llama(seed: int):
    """A Llama vLLM's CPU attention takes (head size 32 or more), with a sharp output layer so that greedy tokens
    are far from ties."""
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                            tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    model = tf.LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def serve(python: Path, jobs: list[dict]) -> list[list[dict]]:
    done = subprocess.run([str(python), str(CLIENT), json.dumps(jobs)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu"})
    results = [json.loads(line.removeprefix("RESULT ")) for line in done.stdout.splitlines()
               if line.startswith("RESULT ")]
    assert done.returncode == 0 and len(results) == len(jobs), done.stderr[-3000:]
    return results


def nvfp4_activations(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """W4A4's activations as NVFP4 defines them: per 16 inputs an FP8 E4M3 scale of amax / 6 in units of the
    per-tensor `input_scale`, each input rounded to the nearest E2M1 value."""
    blocks = x.float().reshape(-1, 16)
    scale = (blocks.abs().amax(-1, keepdim=True) / 6 / input_scale).clamp(max=448).to(torch.float8_e4m3fn).float()
    scale = scale * input_scale
    scaled = (blocks / torch.where(scale == 0, torch.ones_like(scale), scale)).clamp(-6, 6)
    nearest = E2M1[(scaled.abs().unsqueeze(-1) - E2M1).abs().argmin(-1)] * scaled.sign()
    return (nearest * scale).reshape(x.shape).to(x.dtype)


def reference(child: Path, release: Path | None = None, scheme: str | None = None,
              activations: bool = False) -> tf.PreTrainedModel:
    """The child in float32, its quantized linears replaced by their decode from the release's files; with
    `activations`, W4A4's inputs rounded to NVFP4 with the release's input scales."""
    model = tf.AutoModelForCausalLM.from_pretrained(child, dtype=torch.float32).eval()
    if release is None:
        return model
    packed, tensor_scale, divide = {"mfp4": ("weight", "weight_scale_2", False),
                                    "nvfp4a16": ("weight_packed", "weight_global_scale", True)}[scheme]
    written = read_all(release)
    state = model.state_dict()
    modules = [name.removesuffix(".weight_scale") for name in written if name.endswith(".weight_scale")]
    assert modules
    with torch.no_grad():
        for module in modules:
            state[f"{module}.weight"].copy_(decode(written[f"{module}.{packed}"], written[f"{module}.weight_scale"],
                                                   written[f"{module}.{tensor_scale}"], divide))
            if activations and f"{module}.input_scale" in written:
                scale = written[f"{module}.input_scale"].float()
                model.get_submodule(module).register_forward_pre_hook(
                    lambda _, args, scale=scale: (nvfp4_activations(args[0], scale),))
    return model


def prompt_logprobs(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits.float().log_softmax(-1)[0]
    return [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]


@pytest.mark.slow
def test_vllm_serves_the_child_and_its_releases_as_darwin_verified_them(vllm_python, tmp_path):
    parents = {}
    for role, seed in (("father", 1), ("mother", 2)):
        parents[role] = tmp_path / role
        llama(seed).save_pretrained(parents[role])
        picotok.save_beside(parents[role])
    plan = plan_merge(Checkpoint(parents["father"]), Checkpoint(parents["mother"]), Genome.from_dict(V5), "darwin-v5")
    child = merge_to_dir(plan, tmp_path / "child")
    releases = {"nvfp4a16": quantize(child, "nvfp4a16", tmp_path / "nvfp4a16"),
                "mfp4": quantize(child, "mfp4", tmp_path / "mfp4", device="cpu",
                                 calibration=Calibration(("The capital of France is Paris.",), "one prompt"))}
    # float32 where vLLM allows it; modelopt_fp4 takes 16-bit only: float16, whose rounding is 8x finer than bf16's
    jobs = [{"model": str(child), "dtype": "float32"}, {"model": str(releases["nvfp4a16"]), "dtype": "float32"},
            {"model": str(releases["mfp4"]), "dtype": "float16", "activations": "unquantized"},
            {"model": str(releases["mfp4"]), "dtype": "float16"}]
    served = serve(vllm_python, [{**job, "prompts": PROMPTS, "max_tokens": 8} for job in jobs])

    def distance(answers, model):
        return sum((torch.tensor(answer["prompt_logprobs"][1:]) - torch.tensor(prompt_logprobs(model, ids)))
                   .abs().mean().item() for ids, answer in zip(PROMPTS, answers)) / len(PROMPTS)

    unquantized = reference(child, None, None)
    for ids, answer in zip(PROMPTS, served[0]):
        expected = unquantized.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
        assert answer["tokens"] == expected.tolist()
    assert distance(served[0], unquantized) < 1e-3
    # vLLM decodes the weights exactly as darwin wrote them (nvfp4a16: one global scale per group vLLM fuses,
    # q/k/v and gate/up) and as this suite's decoder reads them, within a fifth of what quantizing moved the output
    figures = {"bf16 child": (distance(served[0], unquantized), None)}
    for answers, scheme, tolerance in ((served[1], "nvfp4a16", 1e-3), (served[2], "mfp4", 1e-2)):
        decoded = reference(child, releases[scheme], scheme)
        figures[f"{scheme} weights"] = (distance(answers, decoded), distance(answers, unquantized))
        assert figures[f"{scheme} weights"][0] < tolerance < figures[f"{scheme} weights"][1] / 5
    # W4A4: vLLM rounds the activations to NVFP4 with the release's input scales, as NVFP4 defines it
    w4a4 = reference(child, releases["mfp4"], "mfp4", activations=True)
    weights_only = reference(child, releases["mfp4"], "mfp4")
    figures["mfp4 W4A4"] = (distance(served[3], w4a4), distance(served[3], weights_only))
    print("mean |log-prob difference| from vLLM, against the reference / against the next best:", figures)
    # (a float16 activation an ulp from an E2M1 rounding boundary rounds either way: the rest of the distance)
    assert figures["mfp4 W4A4"][0] < 0.1 and figures["mfp4 W4A4"][0] < figures["mfp4 W4A4"][1] / 2
    assert all(len(answer["tokens"]) == 8 for answers in served for answer in answers)


@pytest.mark.slow
def test_vllm_serves_a_qwen3_5_child(vllm_python, tmp_path):
    """Qwen3.5's hybrid (Gated DeltaNet and full attention) in vLLM, where vLLM's Qwen3.5 model can be imported."""
    probe = subprocess.run([str(vllm_python), "-c", "import torchvision"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("vLLM's Qwen3.5 model imports torchvision, which the CPU venv cannot load (PyPI's torchvision is "
                    f"CUDA-linked: {probe.stderr.strip().splitlines()[-1][:120]})")
    torch.manual_seed(0)
    sizes = {**pico._qwen35_text_kwargs(tie_word_embeddings=False), "hidden_size": 128, "num_attention_heads": 4,
             "head_dim": 32, "linear_key_head_dim": 32, "linear_value_head_dim": 32}  # vLLM's CPU attention: >= 32
    config = tf.Qwen3_5TextConfig(**sizes)
    config.architectures = ["Qwen3_5ForCausalLM"]
    child = tmp_path / "child"
    tf.Qwen3_5ForCausalLM(config).to(torch.bfloat16).save_pretrained(child)
    [answers] = serve(vllm_python, [{"model": str(child), "dtype": "float32", "prompts": PROMPTS, "max_tokens": 8}])
    model = reference(child)
    for ids, answer in zip(PROMPTS, answers):
        expected = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
        assert answer["tokens"] == expected.tolist()


QUESTIONS = [("Which is a fruit", ["banana", "rock", "iron", "seven"]), ("What barks", ["a dog", "a fish", "a tree",
             "a snail"]), ("What melts ice", ["heat", "wind", "dark", "salt"]), ("Where do fish live", ["water",
             "moon", "sand", "trees"]), ("What do bees make", ["honey", "bricks", "steel", "glass"]),
             ("What is cold", ["snow", "fire", "sun", "lava"]), ("What flies", ["a bird", "a stone", "a cow", "a car"]),
             ("What is green", ["grass", "coal", "milk", "blood"])]


@pytest.mark.slow
def test_phase2_on_vllm_scores_every_question_as_the_hf_backend(vllm_python, tmp_path, monkeypatch):
    """`phase2.backend: vllm`: one engine on the father, each candidate's merged tensors loaded into it in place
    (vLLM's reload_weights, no checkpoint written), scored on lm-eval's own requests. Per question, the results
    and margins equal the HF backend's, for two candidates in a row (the second replaces the first's weights) and
    for a checkpoint on disk (the held-out report's scoring); a generative task is refused in one line."""
    from darwin.config import parse_config
    from darwin.errors import DarwinError
    from darwin.evaluate import multiple_choice_task_file, prepared_tasks
    from darwin.fitness import FitnessCache, evaluate_genome, score_model
    from darwin.parents import Parents

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    paths = {}
    for role, seed in (("father", 1), ("mother", 2)):
        paths[role] = tmp_path / role
        llama(seed).float().save_pretrained(paths[role])  # float32 in both backends: their noise is 1e-6
        picotok.save_beside(paths[role])
    rows = [json.dumps({"id": f"q{i}", "question": q, "choices": {"text": c, "label": list("ABCD")},
                        "answerKey": "ABCD"[i % 4]}) for i, (q, c) in enumerate(QUESTIONS)]
    (tmp_path / "toy.jsonl").write_text("\n".join(rows) + "\n")
    task = multiple_choice_task_file("toy_vllm", {"test": tmp_path / "toy.jsonl"}, tmp_path / "tasks")
    phase2 = {"tasks": [str(task)], "split": "test", "device": "cpu",
              "vllm": {"python": str(vllm_python), "memory": 0.1, "dtype": "float32"}}
    tasks = {backend: prepared_tasks((str(task),), "test", parse_config({
        "father": "f", "mother": "m", "heldout": {"split": None},
        "phase2": {**phase2, "backend": backend}}).phase2.eval_options()) for backend in ("hf", "vllm")}
    parents = Parents(str(paths["father"]), str(paths["mother"]), "darwin-v5")
    records = {backend: [evaluate_genome(parents, Genome.from_dict({**V5, "global_ratio": ratio}), tasks[backend],
                                         cache=FitnessCache(tmp_path / f"cache-{backend}"))
                         for ratio in (0.2, 0.8)] for backend in ("hf", "vllm")}
    for hf, vllm in zip(records["hf"], records["vllm"]):
        assert vllm.per_question == hf.per_question and vllm.fitness == hf.fitness
        assert vllm.margins["toy_vllm"] == pytest.approx(hf.margins["toy_vllm"], abs=1e-4)
        assert vllm.worker.endswith(":cpu") and not vllm.cached
    first, second = (r.margins["toy_vllm"] for r in records["vllm"])
    assert max(abs(a - b) for a, b in zip(first, second)) > 1e-2  # the second candidate's weights, not the first's
    on_disk = {backend: score_model(str(paths["mother"]), tasks[backend]) for backend in ("hf", "vllm")}
    assert on_disk["vllm"].per_question == on_disk["hf"].per_question
    assert on_disk["vllm"].margins["toy_vllm"] == pytest.approx(on_disk["hf"].margins["toy_vllm"], abs=1e-4)
    generative = tmp_path / "gen.yaml"
    generative.write_text(f"task: gen_vllm\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
                          f"{tmp_path / 'toy.jsonl'}\ntest_split: test\noutput_type: generate_until\n"
                          "doc_to_text: '{{question}}'\ndoc_to_target: '{{answerKey}}'\n"
                          "metric_list:\n  - metric: exact_match\n")
    options = tasks["vllm"].options
    with pytest.raises(DarwinError, match=r"backend vllm scores loglikelihood .* not gen_vllm \(generate_until\)"):
        prepared_tasks((str(generative),), "test", options)


@pytest.mark.slow
def test_darwin_evolve_runs_phase2_on_vllm(vllm_python, tmp_path, monkeypatch, prefect_api):
    """The run config's `phase2.backend: vllm` through the evolve flow: every Phase 2 genome scored by the engine
    (no failed genome), the held-out report scored on it too, and each fitness the HF backend's."""
    import pandas as pd

    from darwin.config import parse_config
    from darwin.evaluate import multiple_choice_task_file, prepared_tasks
    from darwin.fitness import FitnessCache, evaluate_genome
    from darwin.parents import Parents
    from flows import evolve

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    paths = {}
    for role, seed in (("father", 1), ("mother", 2)):
        paths[role] = tmp_path / role
        llama(seed).float().save_pretrained(paths[role])
        picotok.save_beside(paths[role])
    rows = [json.dumps({"id": f"q{i}", "question": q, "choices": {"text": c, "label": list("ABCD")},
                        "answerKey": "ABCD"[i % 4]}) for i, (q, c) in enumerate(QUESTIONS)]
    for split in ("validation", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    task = multiple_choice_task_file("toy_evolve", {s: tmp_path / f"{s}.jsonl" for s in ("validation", "test")},
                                     tmp_path / "tasks")
    raw = {"father": str(paths["father"]), "mother": str(paths["mother"]), "method": "darwin-v5", "seed": 0,
           "phase1": {"steps": 1, "popsize": 2}, "runner": {"workers": 1},
           "phase2": {"steps": 1, "popsize": 2, "tasks": [str(task)], "device": "cpu", "backend": "vllm",
                      "vllm": {"python": str(vllm_python), "memory": 0.1, "dtype": "float32"}}}
    summary = evolve.run_evolution(parse_config(raw), tmp_path / "run", cache_dir=str(tmp_path / "cache"))
    history = pd.read_parquet(tmp_path / "run" / "history.parquet")
    phase2 = history[history["phase"] == 2]
    assert len(phase2) >= 2 and not phase2["failed"].any()
    assert set(summary["heldout"]["scores"]) == {"father", "mother", "child"}
    hf = prepared_tasks((str(task),), "validation")
    parents = Parents(str(paths["father"]), str(paths["mother"]), "darwin-v5")
    for row in phase2.itertuples():
        genome = Genome.from_dict({name: getattr(row, name) for name in V5})
        assert evaluate_genome(parents, genome, hf, cache=FitnessCache(tmp_path / "hf")).fitness == row.fitness
