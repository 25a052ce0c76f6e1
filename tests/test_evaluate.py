import json
import math
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pico
import picotok
import pytest
import torch
import yaml

from darwin.errors import DarwinError
from darwin.evaluate import (
    EvalOptions,
    TaskSet,
    arc_task_file,
    check_chat_template,
    evaluate,
    fitness_cache_key,
    multiple_choice_task_file,
)
from darwin.stats import mcnemar, spearman

# Answers of very different lengths, so that length normalisation (acc_norm) changes some predictions.
SIMPLE = [
    ("What colour is the sky", ["blue", "a deep shade of green", "red", "the colour of old brass"], 0),
    ("How many legs has a cat", ["four", "two", "eleven and a half", "none at all"], 0),
    ("Which is a fruit", ["a ripe yellow banana", "rock", "iron", "the number seven"], 0),
    ("What melts ice", ["heat", "a cold wind from the north", "darkness", "salt water"], 0),
    ("Where do fish live", ["in water", "on the moon", "deep inside volcanoes", "trees"], 0),
    ("What do bees make", ["honey", "bricks", "steel cables and girders", "glass"], 0),
    ("Which is a planet", ["Mars", "the Atlantic Ocean", "a kitchen table", "Paris"], 0),
    ("What gives light at night", ["the moon", "a wooden spoon", "sand", "an empty cardboard box"], 0),
    ("What do plants need", ["sunlight and water", "plastic", "loud music played all day", "oil"], 0),
    ("Which animal barks", ["a dog", "a goldfish swimming slowly", "an oak tree", "a snail"], 0),
]
# the right answer moved to position i % 4
TOY = [(q, c[-(i % 4):] + c[:-(i % 4)], i % 4) for i, (q, c, _) in enumerate(SIMPLE)]


@pytest.fixture(scope="module")
def tokenizer():
    return picotok.build()


@pytest.fixture(scope="module")
def model():
    # float32 so that lm-eval's batched forward and the reference's one-by-one forward agree to rounding
    return pico.build("llama", seed=3).float()


def write_toy(path: Path, rows=TOY) -> Path:
    lines = []
    for i, (question, choices, gold) in enumerate(rows):
        labels = list("ABCD")
        lines.append(json.dumps({"id": f"toy-{i}", "question": question,
                                 "choices": {"text": choices, "label": labels}, "answerKey": labels[gold]}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def toy_task(tmp_path):
    return multiple_choice_task_file("toy", {"test": write_toy(tmp_path / "toy.jsonl")}, tmp_path / "tasks")


def reference_predictions(model, tokenizer, rows):
    """lm-eval's multiple-choice scoring, computed directly: the loglikelihood of " " + choice after the prompt,
    argmax raw (acc) and divided by the choice's length in characters (acc_norm, as lm-eval 0.4.13 defines it), and
    the right answer's per-character margin over the best wrong one."""
    acc, acc_norm, margins = [], [], []
    for question, choices, gold in rows:
        context = f"Question: {question}\nAnswer:"
        n_context = len(tokenizer(context).input_ids)
        seqs = [tokenizer(context + " " + choice).input_ids for choice in choices]
        width = max(map(len, seqs))
        # right padding leaves a causal model's earlier positions untouched
        batch = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in seqs])
        with torch.no_grad():
            logprobs = model(batch).logits.float().log_softmax(-1)
        lls = [sum(logprobs[j, i - 1, ids[i]].item() for i in range(n_context, len(ids))) for j, ids in enumerate(seqs)]
        acc.append(max(range(len(choices)), key=lambda j: lls[j]) == gold)
        acc_norm.append(max(range(len(choices)), key=lambda j: lls[j] / len(choices[j])) == gold)
        norm = [ll / len(choice) for ll, choice in zip(lls, choices)]
        margins.append(norm[gold] - max(v for j, v in enumerate(norm) if j != gold))
    return acc, acc_norm, margins


def test_evaluate_matches_direct_acc_norm(model, tokenizer, toy_task):
    result = evaluate(model, tokenizer, [toy_task], batch_size=4)
    acc, acc_norm, margins = reference_predictions(model, tokenizer, TOY)
    assert acc != acc_norm, "the toy set should make length normalisation matter"
    assert 0 < sum(acc_norm) < len(TOY), "the toy set should have right and wrong answers"
    assert result.per_question == {"toy": acc_norm}
    assert result.scores == {"toy": pytest.approx(sum(acc_norm) / len(TOY))}
    assert result.fitness == pytest.approx(result.scores["toy"])
    assert result.metrics == {"toy": {"metric": "acc_norm", "output_type": "multiple_choice"}}
    assert result.seconds > 0
    # the measured proxy's margins: lm-eval's own log-likelihoods per character, right answer against the best wrong
    assert result.margins["toy"] == pytest.approx(margins, abs=1e-4)
    assert [m > 0 for m in result.margins["toy"]] == acc_norm


def test_limit_and_two_tasks_average(model, tokenizer, toy_task, tmp_path):
    other = multiple_choice_task_file(
        "toy_rev", {"validation": write_toy(tmp_path / "rev.jsonl", TOY[::-1])}, tmp_path / "tasks")
    tasks = TaskSet([toy_task, other])
    result = evaluate(model, tokenizer, tasks, limit=4)
    _, toy_norm, _ = reference_predictions(model, tokenizer, TOY[:4])
    _, rev_norm, _ = reference_predictions(model, tokenizer, TOY[::-1][:4])
    assert result.per_question == {"toy": toy_norm, "toy_rev": rev_norm}
    assert result.fitness == pytest.approx((sum(toy_norm) + sum(rev_norm)) / 8)
    assert evaluate(model, tokenizer, tasks, limit=4).per_question == result.per_question  # TaskSet reused


def test_task_set_shared_by_threads_and_pickled(model, tokenizer, toy_task):
    """Phase 2 workers are threads (local runner) or processes that receive the TaskSet pickled (Ray)."""
    tasks = TaskSet([toy_task])
    serial = evaluate(model, tokenizer, tasks, limit=6).per_question
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: evaluate(model, tokenizer, tasks, limit=6).per_question, range(2)))
    assert runs == [serial, serial]
    assert evaluate(model, tokenizer, pickle.loads(pickle.dumps(tasks)), limit=6).per_question == serial


def generative_task(directory: Path, answers: list[str]) -> Path:
    """A gsm8k-shaped task (generate_until, exact_match) over the first questions of TOY."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "gen.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for (q, _, _), a in zip(TOY, answers)))
    task = directory / "gen_toy.yaml"
    task.write_text(yaml.safe_dump({
        "task": "gen_toy", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "output_type": "generate_until", "test_split": "test", "doc_to_text": "Q: {{question}}\nA:",
        "doc_to_target": "{{answer}}", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 3, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}))
    return task


def test_a_generative_task_scored_by_the_metric_the_run_names(model, tokenizer, tmp_path):
    """exact_match of a generate_until task: the answers are set to what the model itself generates for the even
    questions (read from lm-eval's own samples), so exactly those are right."""
    from lm_eval.evaluator import evaluate as lm_evaluate
    from lm_eval.models.huggingface import HFLM

    probe = TaskSet([generative_task(tmp_path / "probe", ["?"] * 6)])
    samples = lm_evaluate(lm=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), task_dict=probe.loaded(),
                          bootstrap_iters=0, log_samples=True)["samples"]["gen_toy"]
    generated = [s["filtered_resps"][0] for s in sorted(samples, key=lambda s: s["doc_id"])]
    answers = [text if i % 2 == 0 else text + "never" for i, text in enumerate(generated)]
    task = generative_task(tmp_path / "task", answers)
    with pytest.raises(DarwinError, match="neither acc_norm nor acc: name its metric"):
        evaluate(model, tokenizer, TaskSet([task]))
    for metric in ("exact_match", "exact_match,none"):
        result = evaluate(model, tokenizer, TaskSet([task], options=EvalOptions(metrics=(("gen_toy", metric),))))
        assert result.per_question == {"gen_toy": [True, False] * 3}
        assert result.fitness == pytest.approx(0.5) and result.margins == {"gen_toy": [1.0, 0.0] * 3}
        assert result.metrics == {"gen_toy": {"metric": "exact_match", "output_type": "generate_until"}}


def test_metrics_the_tasks_do_not_compute_or_that_are_better_lower_are_refused(toy_task, tmp_path):
    config = yaml.safe_load(Path(toy_task).read_text())
    config["task"], config["metric_list"] = "toy_brier", [*config["metric_list"], {"metric": "brier_score"}]
    brier = tmp_path / "brier.yaml"
    brier.write_text(yaml.safe_dump(config))
    for tasks, metrics, said in (([toy_task], (("toy", "exact_match"),), "computes no 'exact_match'"),
                                 ([toy_task], (("gsm8k", "acc"),), "names gsm8k, not a task of this run"),
                                 ([brier], (("toy_brier", "brier_score"),), "better lower")):
        with pytest.raises(DarwinError, match=said):
            TaskSet(tasks, options=EvalOptions(metrics=metrics))


def test_few_shot_chat_template_and_auto_batch_size_as_lm_eval_runs_them(model, tokenizer, toy_task, tmp_path):
    plain = evaluate(model, tokenizer, TaskSet([toy_task]), batch_size=4)
    assert evaluate(model, tokenizer, TaskSet([toy_task]), batch_size="auto").per_question == plain.per_question
    few = TaskSet([toy_task], options=EvalOptions(num_fewshot=2))
    assert few.loaded()["tasks"]["toy"].get_config("num_fewshot") == 2
    assert evaluate(model, tokenizer, few, batch_size=4).margins["toy"] != pytest.approx(plain.margins["toy"])
    model_dir = tmp_path / "model"
    tokenizer.save_pretrained(model_dir)
    with pytest.raises(DarwinError, match="has no chat template"):
        check_chat_template(model_dir)
    chat = picotok.build()
    chat.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    chat.save_pretrained(model_dir)
    check_chat_template(model_dir)
    templated = evaluate(model, chat, TaskSet([toy_task], options=EvalOptions(apply_chat_template=True)), batch_size=4)
    assert templated.margins["toy"] != pytest.approx(plain.margins["toy"])
    key = fitness_cache_key({}, "g", TaskSet([toy_task]), None)
    assert key != fitness_cache_key({}, "g", few, None) and key == fitness_cache_key({}, "g", [toy_task], None)


def test_missing_task_file_is_a_user_error(tmp_path):
    with pytest.raises(DarwinError, match="does not exist"):
        TaskSet([tmp_path / "nope.yaml"])
    with pytest.raises(DarwinError, match="test or validation"):
        multiple_choice_task_file("t", {"train": write_toy(tmp_path / "t.jsonl")}, tmp_path)


def test_local_arc_copy_is_lm_evals_arc_challenge(arc_dir, tmp_path):
    import lm_eval
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    ours = yaml.safe_load(arc_task_file(arc_dir, tmp_path).read_text())
    theirs = load_yaml(Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_challenge.yaml")
    for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "test_split",
                "should_decontaminate", "doc_to_decontamination_query"):
        assert ours[key] == theirs[key], key
    assert ours["dataset_path"] == "json"
    for split, path in ours["dataset_kwargs"]["data_files"].items():
        assert Path(path).is_absolute() and Path(path).samefile(arc_dir / f"{split}.jsonl")


def test_real_arc_challenge_subset(model, tokenizer, arc_dir, tmp_path):
    result = evaluate(model, tokenizer, [arc_task_file(arc_dir, tmp_path)], limit=20)
    answers = result.per_question["arc_challenge_local"]
    assert len(answers) == 20
    assert result.scores["arc_challenge_local"] == pytest.approx(sum(answers) / 20)


def test_mcnemar_known_values():
    # Fagerland, Lydersen & Laake (2013), airway hyper-responsiveness: 1 vs 7 discordant pairs, exact p = 0.070
    a = [True] * 1 + [False] * 7 + [True] * 5 + [False] * 8
    b = [False] * 1 + [True] * 7 + [True] * 5 + [False] * 8
    assert mcnemar(a, b) == pytest.approx(18 / 256)
    assert round(mcnemar(a, b), 3) == 0.070
    # 3 vs 12: 2 * P(X <= 3), X ~ Binomial(15, 1/2); concordant pairs change nothing
    a = [True] * 3 + [False] * 12
    b = [False] * 3 + [True] * 12
    expected = 2 * sum(math.comb(15, k) for k in range(4)) / 2**15
    assert mcnemar(a, b) == pytest.approx(expected)
    assert mcnemar(a + [True] * 50, b + [True] * 50) == pytest.approx(expected)
    assert mcnemar(b, a) == pytest.approx(expected)
    assert mcnemar([True, False], [False, True]) == 1.0
    assert mcnemar([True, False], [True, False]) == 1.0
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)


def test_fitness_cache_key(tmp_path, toy_task):
    parents = {"father": "f" * 16, "mother": "m" * 16}
    key = fitness_cache_key(parents, "g1", ["arc_challenge", toy_task], 20)
    assert key == fitness_cache_key({"mother": "m" * 16, "father": "f" * 16}, "g1", [toy_task, "arc_challenge"], 20)
    changed = [
        fitness_cache_key({"father": "f" * 16, "mother": "x" * 16}, "g1", ["arc_challenge", toy_task], 20),
        fitness_cache_key(parents, "g2", ["arc_challenge", toy_task], 20),
        fitness_cache_key(parents, "g1", ["arc_easy", toy_task], 20),
        fitness_cache_key(parents, "g1", ["arc_challenge", toy_task], None),
        fitness_cache_key(parents, "g1", ["arc_challenge"], 20),
    ]
    assert len({key, *changed}) == len(changed) + 1

    # a task file keys by content, not path: a copy elsewhere keys the same; a changed question does not
    moved = tmp_path / "elsewhere" / "toy.yaml"
    moved.parent.mkdir()
    shutil.copy(toy_task, moved)
    assert fitness_cache_key(parents, "g1", ["arc_challenge", moved], 20) == key
    data = tmp_path / "toy.jsonl"
    data.write_text(data.read_text().replace("sky", "sea"))
    assert fitness_cache_key(parents, "g1", ["arc_challenge", toy_task], 20) != key
