import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import pico
from darwin.checkpoint import Checkpoint, CheckpointWriter, check_compatible, resolve
from darwin.config import parse_config
from darwin.errors import DarwinError
from flows.cli import main


def test_reads_lazily_by_name_across_shards(pico_checkpoint):
    path = pico_checkpoint("qwen3_5")
    checkpoint = Checkpoint(path)
    assert len(checkpoint.shards) > 5
    model = pico.build("qwen3_5")
    state = model.state_dict()
    for name in ["model.language_model.layers.1.self_attn.q_proj.weight", "model.visual.blocks.0.attn.qkv.weight"]:
        assert torch.equal(checkpoint.read(name), state[name])
    assert checkpoint.tensors["mtp.fc.weight"].shape == (64, 128)
    assert checkpoint.num_layers == 4


def test_single_file_checkpoint(tmp_path):
    save_file({"model.layers.0.mlp.up_proj.weight": torch.ones(4, 4)}, tmp_path / "model.safetensors")
    assert Checkpoint(tmp_path).read("model.layers.0.mlp.up_proj.weight").sum() == 16


def test_unaligned_tensors_and_every_dtype_read_back(tmp_path):
    """Raw bits and tensors agree for every dtype, a tensor after an odd-sized one (unaligned) included."""
    state = {"a.odd": torch.arange(3, dtype=torch.uint8), "b.after": torch.randn(5, 3).to(torch.bfloat16),
             "c.f8": torch.randn(4).to(torch.float8_e4m3fn), "d.f16": torch.randn(2, 2).half(),
             "e.bool": torch.tensor([True, False]), "f.i64": torch.tensor([-1, 2**40])}
    with CheckpointWriter(tmp_path / "odd") as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
    checkpoint = Checkpoint(tmp_path / "odd")
    for name, tensor in state.items():
        assert torch.equal(checkpoint.read(name).view(torch.uint8), tensor.view(torch.uint8)), name
        assert checkpoint.read_array(name).tobytes() == tensor.view(torch.uint8).numpy().tobytes(), name


def test_unknown_dtype_is_one_clear_error(tmp_path):
    save_file({"w": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "model.safetensors")
    with pytest.raises(DarwinError, match="w in .*model.safetensors has dtype C64"):
        Checkpoint(tmp_path)


def test_pickle_checkpoints_are_refused_unless_asked(tmp_path):
    torch.save({"model.layers.0.mlp.up_proj.weight": torch.ones(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(DarwinError, match="pickle"):
        Checkpoint(tmp_path)
    pickled = Checkpoint(tmp_path, allow_pickle=True)
    assert pickled.read("model.layers.0.mlp.up_proj.weight").shape == (2, 2)
    assert pickled.read_array("model.layers.0.mlp.up_proj.weight").tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_bad_inputs_name_the_file(tmp_path, pico_checkpoint):
    with pytest.raises(DarwinError, match="does not exist"):
        Checkpoint(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    source = pico_checkpoint("llama")
    for item in source.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    shard = sorted(broken.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DarwinError, match=f"truncated shard .*{shard.name}"):
        Checkpoint(broken)
    shard.unlink()
    with pytest.raises(DarwinError, match=f"missing file: {shard.name}"):
        Checkpoint(broken)


def test_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DarwinError, match="could not be fetched from the Hugging Face hub"):
        resolve("darwin-test-org/not-a-real-model")


def test_a_hub_revision_resolves_through_huggingface_hubs_cache(pico_checkpoint, tmp_path, monkeypatch):
    """`org/name@rev` is huggingface_hub's revision: a cache holding two revisions of one repo (as downloads leave
    it: refs/<rev> -> commit, snapshots/<commit>/) gives each; a revision it lacks is named in the error."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--acme--pico"
    commits = {"v1": "1" * 40, "main": "2" * 40}
    for (ref, commit), seed in zip(commits.items(), (0, 1)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        shutil.copytree(pico_checkpoint("llama", seed=seed), repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve("acme/pico@v1") == repo / "snapshots" / commits["v1"]
    assert resolve("acme/pico") == repo / "snapshots" / commits["main"]
    assert Checkpoint("acme/pico@v1").fingerprint() != Checkpoint("acme/pico").fingerprint()
    with pytest.raises(DarwinError, match="'acme/pico@v2' is not a local directory"):
        resolve("acme/pico@v2")


def test_fsspec_url_is_copied_once(pico_checkpoint, tmp_path, monkeypatch):
    import darwin.checkpoint.location as ckpt

    monkeypatch.setattr(ckpt, "REMOTE_CACHE", tmp_path / "cache")
    url = "memory://models/llama"
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(str(pico_checkpoint("llama")) + "/", "/models/llama", recursive=True)
    first = Checkpoint(url)
    assert first.read("lm_head.weight").shape == (pico.VOCAB, 64)
    assert resolve(url) == first.path


def test_writer_is_atomic_and_streams_shards(tmp_path, pico_checkpoint):
    out = tmp_path / "child"
    template = pico_checkpoint("llama")
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, template=template) as writer:
            writer.add("a", torch.ones(3))
            raise RuntimeError("boom")
    assert not out.exists() and not list(tmp_path.iterdir())
    with CheckpointWriter(out, template=template, max_shard_bytes=32) as writer:
        for i in range(5):
            writer.add(f"t{i}", torch.full((8,), float(i), dtype=torch.bfloat16))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00003.safetensors",
                                                         "model-00002-of-00003.safetensors",
                                                         "model-00003-of-00003.safetensors"]
    assert (out / "config.json").exists()
    assert Checkpoint(out).read("t4").tolist() == [4.0] * 8
    with pytest.raises(DarwinError, match="already exists"):
        CheckpointWriter(out)


def test_shard_stream_refuses_what_its_header_did_not_announce(tmp_path):
    writer = CheckpointWriter(tmp_path / "out")
    stream = writer.shard("model.safetensors", [("a", "F8_E4M3", (4,)), ("b", "BF16", (2, 3))])
    with pytest.raises(ValueError, match="expected a F8_E4M3"):
        stream.write("a", torch.zeros(4).to(torch.float8_e5m2))  # same width, another dtype
    stream.write("a", torch.zeros(4).to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="expected b BF16"):
        stream.write("b", np.zeros((2, 3), dtype=np.float16))  # raw bits of the same width, not bf16's
    with pytest.raises(ValueError, match=r"expected b BF16\[2, 3\]"):
        stream.write("b", np.zeros((3, 2), dtype=np.int16))
    stream.write("b", np.zeros((2, 3), dtype=np.int16))
    stream.close()
    writer.abort()


def test_compatibility_names_the_first_mismatches(pico_checkpoint):
    llama, qwen = Checkpoint(pico_checkpoint("llama")), Checkpoint(pico_checkpoint("qwen3"))
    with pytest.raises(DarwinError, match="father and mother do not match: architectures"):
        check_compatible(llama, qwen)
    check_compatible(llama, Checkpoint(pico_checkpoint("llama", perturb=1)))


def test_cli_bad_path_is_one_line(tmp_path, capsys):
    assert main(["profile", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model path does not exist" in err[0]


def test_the_command_line_refuses_bad_options_before_any_work(tmp_path, capsys, pico_checkpoint):
    model = str(pico_checkpoint("llama"))
    for argv, said in ((["quantize", model, "--scheme", "nvfp5", "--out", str(tmp_path / "q")], "invalid choice"),
                       (["profile", model, "--out", str(tmp_path / "p"), "--device", "gpu0"], "'gpu0' is not a device"),
                       (["merge", "--father", model, "--mother", model, "--genome", "g.json", "--method", "dare-ties",
                         "--device", "tpu", "--out", str(tmp_path / "m")], "'tpu' is not a device")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert said in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("darwin 0.")
    with pytest.raises(DarwinError, match="phase2.device"):
        parse_config({"father": "a", "mother": "b", "phase2": {"device": "gpu"}})


def test_merge_reads_pickle_parents_when_allowed(tmp_path, pico_checkpoint, capsys):
    """The refusal names --allow-pickle, and `darwin merge` has it."""
    from transformers import AutoModelForCausalLM

    parents = {}
    for role, perturb in (("father", 1), ("mother", 2)):
        source = pico_checkpoint("llama", perturb=perturb)
        parents[role] = tmp_path / role
        parents[role].mkdir()
        (parents[role] / "config.json").write_text((source / "config.json").read_text())
        # the pickle layout older training scripts left (transformers 5 saves safetensors only)
        torch.save(AutoModelForCausalLM.from_pretrained(source).state_dict(), parents[role] / "pytorch_model.bin")
    genome = tmp_path / "genome.json"
    genome.write_text(json.dumps({"global_ratio": 0.5, "attn_ratio": 0.5, "ffn_ratio": 0.5, "embed_ratio": 0.5,
                                   "density_a": 0.9, "density_b": 0.9}))
    argv = ["merge", "--father", str(parents["father"]), "--mother", str(parents["mother"]), "--genome", str(genome),
            "--method", "darwin-v5", "--out", str(tmp_path / "child")]
    assert main(argv) == 2 and "--allow-pickle" in capsys.readouterr().err
    assert main([*argv, "--allow-pickle"]) == 0
    assert Checkpoint(tmp_path / "child").tensors
