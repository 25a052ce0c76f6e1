"""Probe layer importance on pico models: skipping a layer moves the output, skipping an identity layer does not."""

import re

import pandas as pd
import pico
import picotok
import pytest
import torch

from darwin import probes
from darwin.errors import DarwinError

# Everything a decoder block writes into the residual stream goes through one of these projections.
OUTPUT_PROJECTIONS = re.compile(r"\.(o_proj|out_proj|down_proj)(\.weight)?$")
SHORT_PROBES = {"MATH": ["What is 2 + 2?", "Solve 3x = 9."], "CODE": ["def add(a, b):", "print('hi')"],
                "KNOWLEDGE": ["The capital of France is a long sentence to pad against"]}


def make_identity(model, layer: int):
    """Zero every output projection of one decoder layer, so it adds nothing to the residual."""
    block = probes.decoder_layers(model)[layer]
    with torch.no_grad():
        zeroed = [p.zero_() for name, p in block.named_parameters() if OUTPUT_PROJECTIONS.search(name)]
    assert zeroed
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return picotok.build()


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe", "qwen3_5_text", "qwen3_5_moe_text"])
def test_skipping_a_layer_moves_the_output_and_an_identity_layer_does_not(family, tokenizer):
    model = make_identity(pico.build(family), layer=2)
    frame = probes.layer_importance(model, tokenizer, SHORT_PROBES, batch_size=4)
    assert list(frame.columns) == ["layer", "probe", "importance"]
    assert len(frame) == 4 * len(SHORT_PROBES)
    curve = frame.groupby("layer")["importance"].min()
    assert curve[2] < 1e-5
    assert (curve.drop(2) > 1e-3).all()


def test_skip_hook_is_removed_afterwards(tokenizer):
    model = pico.build("qwen3")
    batch = next(probes.batches(tokenizer, ["a short prompt"], 1, "cpu"))[1]
    before = probes.final_hidden(model, batch)
    with probes.skipped(probes.decoder_layers(model)[1]):
        during = probes.final_hidden(model, batch)
    after = probes.final_hidden(model, batch)
    assert not torch.equal(before, during)
    assert torch.equal(before, after)


@pytest.mark.parametrize("family", ["llama", "qwen3_5_text"])
@pytest.mark.parametrize("pool", ["last", "mean"])
def test_padding_does_not_change_importance(family, pool, tokenizer):
    """A prompt's importance is the same alone as in a right-padded batch with longer prompts (attention and
    Gated DeltaNet layers alike); float32 so that only padding could explain a difference."""
    model = pico.build(family, dtype=torch.float32)
    alone = probes.layer_importance(model, tokenizer, SHORT_PROBES, batch_size=1, pool=pool)
    batched = probes.layer_importance(model, tokenizer, SHORT_PROBES, batch_size=5, pool=pool)
    torch.testing.assert_close(torch.tensor(batched["importance"].to_numpy()),
                               torch.tensor(alone["importance"].to_numpy()), atol=1e-5, rtol=1e-4)


def test_multimodal_qwen35_checkpoint_loads_as_its_text_model(pico_checkpoint, tmp_path):
    source = pico_checkpoint("qwen3_5")
    for path in source.iterdir():
        (tmp_path / path.name).symlink_to(path)
    picotok.save_beside(tmp_path)
    model, tokenizer = probes.load_model(tmp_path, "cpu")
    assert type(model).__name__ == "Qwen3_5ForCausalLM"
    reference = pico.build("qwen3_5").model.language_model.layers[3].mlp.down_proj.weight
    assert torch.equal(probes.decoder_layers(model)[3].mlp.down_proj.weight, reference)
    frame = probes.layer_importance(model, tokenizer, SHORT_PROBES)
    assert sorted(frame["layer"].unique()) == [0, 1, 2, 3]


def test_a_model_without_a_tokenizer_is_one_line_of_error(pico_checkpoint):
    with pytest.raises(DarwinError, match="no usable tokenizer") as error:
        probes.load_model(pico_checkpoint("llama"), "cpu")
    assert "\n" not in str(error.value)


def test_shipped_probe_sets_and_a_replacement_directory(tmp_path):
    shipped = probes.load_probes()
    assert sorted(shipped) == ["CODE", "KNOWLEDGE", "LANGUAGE", "MATH", "REASONING"]
    assert all(len(prompts) >= 3 and all(p.strip() for p in prompts) for prompts in shipped.values())
    (tmp_path / "logic.txt").write_text("first prompt\n\n  second prompt  \n")
    (tmp_path / "notes.md").write_text("not a probe")
    assert probes.load_probes(tmp_path) == {"LOGIC": ["first prompt", "second prompt"]}
    (tmp_path / "logic.txt").unlink()
    with pytest.raises(DarwinError, match="no probe prompts"):
        probes.load_probes(tmp_path)
    with pytest.raises(DarwinError, match="does not exist"):
        probes.load_probes(tmp_path / "missing")


def test_probe_scores_weight_probes():
    frame = pd.DataFrame({"layer": [0, 0, 1, 1], "probe": ["A", "B", "A", "B"], "importance": [0.2, 0.4, 0.1, 0.0]})
    assert probes.probe_scores(frame) == pytest.approx({0: 0.3, 1: 0.05})
    assert probes.probe_scores(frame, {"A": 3, "B": 1}) == pytest.approx({0: 0.25, 1: 0.075})
    assert probes.probe_scores(frame, {"B": 1}) == pytest.approx({0: 0.4, 1: 0.0})
    with pytest.raises(DarwinError, match="unknown probes"):
        probes.probe_scores(frame, {"C": 1})


def test_write_importance_files(tmp_path, tokenizer):
    frame = probes.layer_importance(pico.build("llama"), tokenizer, SHORT_PROBES)
    path = probes.write_importance(frame, tmp_path / "out")
    assert path == tmp_path / "out" / "probes.parquet"
    pd.testing.assert_frame_equal(probes.read_importance(tmp_path / "out"), frame)
    assert (tmp_path / "out" / "probes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["probes.parquet", "probes.png"]


def write_probe_dir(path, sets: dict[str, list[str]]):
    path.mkdir(parents=True, exist_ok=True)
    for name, prompts in sets.items():
        (path / f"{name.lower()}.txt").write_text("\n".join(prompts) + "\n")
    return path


def test_probe_flow_writes_importance_and_routing_of_a_moe_model(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.probe import probe_flow

    model = picotok.save_beside(pico.save(pico.build("qwen3_5_moe_text"), tmp_path / "moe"))
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("one calibration text\n\nanother, a little longer, calibration text\n")
    result = probe_flow(str(model), str(tmp_path / "out"), str(write_probe_dir(tmp_path / "p", SHORT_PROBES)),
                        str(calibration), device="cpu", label="Mother MoE")
    frame = pd.read_parquet(result["probes"])
    assert set(frame["probe"]) == set(SHORT_PROBES) and sorted(frame["layer"].unique()) == [0, 1, 2, 3]
    routing = pd.read_parquet(result["routing"])
    assert routing.attrs["tokens"] == len("one calibration text") + len("another, a little longer, calibration text")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "probes.parquet", "probes.png", "routing.parquet", "routing.png"]
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    expected = {"probes-mother-moe", "probes-mother-moe-summary", "routing-mother-moe", "routing-mother-moe-summary"}
    with get_client(sync_client=True) as client:  # by key: the session's server holds more than one page
        artifacts = {artifact.key: artifact for artifact in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[*expected, "probes-mother-moe-progress"])))}
    assert expected <= set(artifacts)
    assert artifacts["probes-mother-moe-progress"].data == 100.0


def test_probe_command_on_a_dense_model_writes_no_routing(prefect_api, tmp_path):
    from flows.cli import main

    model = picotok.save_beside(pico.save(pico.build("llama"), tmp_path / "llama"))
    probe_dir = write_probe_dir(tmp_path / "p", {"ONLY": ["a single probe prompt"]})
    assert main(["probe", str(model), "--out", str(tmp_path / "out"), "--probes", str(probe_dir),
                 "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["probes.parquet", "probes.png"]
    assert main(["probe", str(model), "--out", str(tmp_path / "out"), "--probes", str(tmp_path / "none")]) == 2
