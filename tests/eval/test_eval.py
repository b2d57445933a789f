"""Stage 3: IFEval scoring on hand-written responses, the answer matcher, drift, report and plots."""
import json
import os

import pytest
import torch

from conftest import tiny_config
from selfaug import train
from selfaug.config import build_config
from selfaug.eval import evaluate, ifeval
from selfaug.models import load_model


def _row(ids, kwargs):
    return {"key": 1, "prompt": "p", "instruction_id_list": ids, "kwargs": kwargs}


@pytest.mark.parametrize("instruction,kwargs,passing,failing", [
    ("punctuation:no_comma", {}, "No commas here.", "Yes, a comma."),
    ("change_case:english_lowercase", {}, "all lower case.", "Not all lower case."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* only one"),
    ("startend:end_checker", {"end_phrase": "Is there anything else?"}, "Done. Is there anything else?", "Done."),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3}, "One. Two.",
     "One. Two. Three. Four."),
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 2},
     "THIS is VERY loud", "this is quiet"),
    ("keywords:existence", {"keywords": ["salmon"]}, "I like salmon.", "I like tuna."),
    ("language:response_language", {"language": "fr"}, "Je suis très content de vous voir aujourd'hui.",
     "I am very happy to see you today."),
])
def test_ifeval_checkers_pass_and_fail_known_instructions(instruction, kwargs, passing, failing):
    rows = [_row([instruction], [kwargs])] * 2
    s = ifeval.score(rows, [passing, failing])
    assert s["strict_prompt_acc"] == 0.5 and s["strict_instruction_acc"] == 0.5
    assert s["per_prompt"][0]["strict"] == [True] and s["per_prompt"][1]["strict"] == [False]


def test_ifeval_prompt_level_needs_every_instruction_and_loose_forgives_a_first_line():
    row = _row(["punctuation:no_comma", "change_case:english_lowercase"], [{}, {}])
    s = ifeval.score([row], ["all lowercase, with a comma"])
    assert s["strict_prompt_acc"] == 0 and s["strict_instruction_acc"] == 0.5
    s = ifeval.score([_row(["punctuation:no_comma"], [{}])], ["Sure, here it is:\nno commas at all"])
    assert s["strict_prompt_acc"] == 0 and s["loose_prompt_acc"] == 1


def test_shipped_ifeval_subset_loads_with_attribution():
    rows = ifeval.load_prompts()
    assert len(rows) == 271 and all(r["instruction_id_list"] for r in rows)
    readme = open(os.path.join(os.path.dirname(ifeval.DEFAULT_PROMPTS), "IFEVAL_README.md")).read()
    assert "Apache-2.0" in readme and "Zhou et al." in readme


@pytest.mark.parametrize("generated,gold,ok", [
    ("Answer: Fatund Cidran", "Fatund Cidran", True),
    ("answer: fatund cidran.", "Fatund Cidran", True),
    ("The river is 1847 km long.", "1847", True),
    ("It was 18470.", "1847", False),
    ("Answer: Fatund", "Fatund Cidran", False),
    ("Answer: red-finned", "red-finned", True),
    ("", "x", False),
])
def test_answer_matcher(generated, gold, ok):
    assert evaluate.answer_found(generated, gold) is ok


def test_strict_accuracy_refuses_an_answer_that_lists_every_documents_value():
    from selfaug.data import builtin
    record = builtin.generate("eval", 1, seed=3, num_documents=4)[0]
    (others,) = evaluate.rivals([record])
    assert others == sorted(set(record["distractors"]) - {record["answer"]}) and len(record["distractors"]) == 3
    plain = f"Answer: {record['answer']}"
    copying = "Answer: " + "; ".join(sorted(others + [record["answer"]]))
    assert evaluate.answer_found(copying, record["answer"])  # the plain metric is fooled
    assert evaluate.strict_correct(plain, [record["answer"]], others)
    assert not evaluate.strict_correct(copying, [record["answer"]], others)
    assert not evaluate.strict_correct("Answer: " + others[0], [record["answer"]], others)


def test_strict_accuracy_on_fixed_strings_and_the_rule_for_data_without_distractors():
    # the demo's case: a headquarters question answered with every company's headquarters
    golds, others = ["Brastonville"], ["Quelport", "Vraeburg"]
    listing = "Answer: Brastonville, Quelport and Vraeburg are the headquarters of the three companies."
    assert evaluate.strict_correct("Answer: Brastonville", golds, others)
    assert evaluate.answer_found(listing, golds[0]) and not evaluate.strict_correct(listing, golds, others)
    assert evaluate.strict_correct("Answer: the port of rotterdam", ["rotterdam", "the port of rotterdam"], [])
    # user data: the other records' answers found in this record's documents, never the gold or a part of it
    records = [{"question": "Where is Tolvar?", "answer": "Rotterdam",
                "documents": ["Tolvar is in Rotterdam.", "Brenmoor is in Antwerp.", "Kessa makes 1871 skates."]},
               {"question": "Where is Brenmoor?", "answer": "Antwerp", "documents": ["Brenmoor is in Antwerp."]},
               {"question": "When?", "answer": "1871", "documents": ["Founded in 1871 in Rotterdam."]},
               {"question": "Which port?", "answer": "Port of Rotterdam", "documents": ["Rotterdam and Antwerp."]}]
    assert evaluate.rivals(records) == [["1871", "Antwerp"], [], ["Rotterdam"], ["Antwerp"]]


def _live_drift(base, model, texts):
    """The reference: both models live, full vocabulary, every position (what eval computed before the store)."""
    from selfaug.loss import LiveTeacher, kl_sum
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([t.input_ids])
            hb, hm = base.model(input_ids=ids).last_hidden_state, model.model(input_ids=ids).last_hidden_state
            rows = torch.arange(len(t.input_ids))
            s, n = kl_sum(hm, model.lm_head.weight, None, rows * 0, rows, LiveTeacher(hb[0], base.lm_head.weight))
            total, count = total + s.item(), count + n
    return total / count


@pytest.mark.parametrize("k", [49152, 1024, 16])
def test_drift_from_the_base_store_equals_the_live_drift_at_full_k_and_never_exceeds_it(tmp_path, k):
    """The base's signal stored with stage 1's code (every position, top-k): at k = |V| the drift is the live
    full-vocabulary one; below, the bucket KL, never above it."""
    from selfaug.eval import drift
    from selfaug.models import load_tokenizer
    base, tok = load_model("builtin:tiny-llama"), load_tokenizer("builtin:tiny-llama")
    other = load_model("builtin:tiny-llama")
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.add_(0.5)
    texts = [drift.DriftText(0, [1, 5, 9, 200, 7, 30], 2), drift.DriftText(1, [3, 4, 5, 6], 1)]
    cfg = tiny_config(str(tmp_path), eval={"drift_k": k})
    teacher_store = drift.base_store(cfg, base, tok, texts, torch.float32, torch.device("cpu"))
    assert teacher_store.lengths().kl.tolist() == [6, 4]  # every position
    assert abs(drift.drift(base, teacher_store)[0]) < 1e-6
    live = _live_drift(base, other, texts)
    mean, per = drift.drift(other, teacher_store)
    assert len(per) == 2 and sum(s for s, _ in per) / sum(n for _, n in per) == pytest.approx(mean)
    if k == 49152:
        assert mean == pytest.approx(live, rel=1e-4)
    else:
        assert 0 < mean <= live * (1 + 1e-5)


def test_eval_holds_one_model_at_a_time_and_resumes_with_the_models_not_yet_scored(tmp_path, tiny_store, monkeypatch):
    """Every model loaded is gone before the next one loads (weak references), and an evaluation stopped at its
    second run keeps the base's and the first run's scores: the rerun evaluates only the second."""
    import gc
    import weakref
    cfg = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": tiny_store.teacher.output_dir},
                      train={"max_steps": 1},
                      eval={"max_ifeval_prompts": 2, "max_rag_examples": 2, "max_drift_prompts": 2, "max_new_tokens": 4,
                            "rag_max_new_tokens": 4})
    runs = []
    for name, seed in (("one", 1), ("two", 2)):
        runs.append(train.train(build_config(cfg.to_dict(), [f"train.output_dir={tmp_path / name}",
                                                             f"train.seed={seed}"])))
    cfg = build_config(cfg.to_dict(), [f"eval.runs={','.join(runs)}"])
    alive, scored = [], []
    real_model, real_run, real_score = evaluate.load_model, evaluate.load_run_model, evaluate.evaluate_model

    def track(model):
        gc.collect()
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        if any(r() is inner for r in alive):  # an adapter on its base (unmerged): the same model
            return model
        assert all(r() is None for r in alive), "a model was loaded while another was in memory"
        alive.append(weakref.ref(model))
        return model
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: track(real_model(*a, **k)))
    monkeypatch.setattr(evaluate, "load_run_model", lambda *a, **k: (lambda m, a_: (track(m), a_))(*real_run(*a, **k)))

    def score(name, *a):
        if name == "two" and not scored.count("stop"):
            scored.append("stop")
            raise KeyboardInterrupt  # the evaluation is stopped during its last model
        scored.append(name)
        return real_score(name, *a)
    monkeypatch.setattr(evaluate, "evaluate_model", score)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run(cfg)
    assert scored == ["base", "one", "stop"] and len(alive) == 3
    report = evaluate.run(cfg)
    assert scored == ["base", "one", "stop", "two"] and len(alive) == 4  # only the second run was loaded again
    assert set(report["models"]) == {"base", "one", "two"} and report["sizes"]["drift_texts"] == 2
    assert report["models"]["one"]["drift_kl"] > 0


def test_eval_writes_report_and_plots(tmp_path, tiny_store):
    cfg = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": tiny_store.teacher.output_dir},
                      train={"max_steps": 2, "merge_adapter": True},
                      eval={"runs": str(tmp_path / "run"), "max_ifeval_prompts": 3, "max_rag_examples": 3,
                            "max_drift_prompts": 2, "max_new_tokens": 8, "rag_max_new_tokens": 4})
    train.train(cfg)
    assert os.path.exists(tmp_path / "run" / "final" / "merged" / "config.json")
    report = evaluate.run(cfg)
    saved = json.load(open(tmp_path / "eval" / "report.json"))
    assert set(saved["models"]) == {"base", "run"} == set(report["models"])
    for r in saved["models"].values():
        assert 0 <= r["rag_strict_accuracy"] <= r["rag_accuracy"] <= 1 and 0 <= r["ifeval"]["strict_prompt_acc"] <= 1
        assert r["rag_examples"] == 3 and all(1 <= len(s["others"]) <= 3 for s in r["rag_samples"])  # 4 documents
    assert saved["models"]["base"]["drift_kl"] == pytest.approx(0, abs=1e-7)
    assert saved["models"]["run"]["drift_kl"] > 0
    for png in ("tradeoff.png", "curves.png"):
        with open(tmp_path / "eval" / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_tradeoff_plot_joins_fixed_alpha_runs_and_budget_runs_into_one_curve_each(tmp_path, monkeypatch):
    from selfaug.eval import plots
    drawn = []
    real = plots.plt.Axes.plot
    monkeypatch.setattr(plots.plt.Axes, "plot", lambda ax, *a, **k: drawn.append(k.get("label")) or real(ax, *a, **k))
    points = [{"label": f"alpha{a}", "accuracy": 0.5 + a / 4, "drift_kl": 0.3 - a / 5, "instruction": 0.2,
               "alpha": a, "drift_budget": None} for a in (0.0, 0.5, 1.0)]
    points += [{"label": f"budget{b}", "accuracy": 0.7, "drift_kl": b, "instruction": 0.25, "alpha": 0.5,
                "drift_budget": b} for b in (0.02, 0.04)]
    points.append({"label": "base", "accuracy": 0.4, "drift_kl": 0.0, "instruction": 0.3})
    path = plots.plot_tradeoff(points, str(tmp_path))
    assert os.path.getsize(path) > 1000
    assert drawn == ["fixed alpha", "fixed alpha", "drift budget", "drift budget"]  # both panels, each knob
    # seeds at the same alpha (a study): the curve goes through their mean, one point per alpha, not seed to seed
    lines = []
    monkeypatch.setattr(plots.plt.Axes, "plot", lambda ax, x, y, **k: lines.append((k.get("label"), x, y)) or real(
        ax, x, y, **k))
    seeds = [{**p, "label": f"{p['label']}-seed{i}", "accuracy": p["accuracy"] + d}
             for i, d in enumerate((-0.1, 0.1)) for p in points if p.get("alpha") is not None and not p["drift_budget"]]
    plots.plot_tradeoff(seeds, str(tmp_path), "seeds.png")
    label, x, y = lines[0]
    assert label == "fixed alpha" and x == pytest.approx([0.3, 0.2, 0.1]) and y == pytest.approx([0.5, 0.625, 0.75])


def test_a_mistyped_run_is_one_line_before_the_base_model_loads(tmp_path, monkeypatch):
    from selfaug.config import ConfigError
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("the base model was loaded"))
    cfg = tiny_config(str(tmp_path), eval={"runs": [str(tmp_path / "runs" / "lroa")], "max_ifeval_prompts": 1})
    with pytest.raises(ConfigError, match=r"eval.runs: .*lroa is neither a selfaug run with a final/ model"):
        evaluate.run(cfg)


def test_runs_with_the_same_folder_name_or_named_base_get_rows_of_their_own(tmp_path):
    """`a/selfaug` and `b/selfaug`, or a run named `base`, overwrote each other's (or the base's) row in report.json:
    where names collide, a run is named by its path relative to the runs' common parent."""
    names = evaluate.model_names
    assert names(["runs/lora", "runs/selfaug"]) == ["lora", "selfaug"]  # unique: the folder's name, as before
    assert names(["x/a/selfaug", "x/b/selfaug"]) == ["a/selfaug", "b/selfaug"]
    assert names([str(tmp_path / "base"), str(tmp_path / "lora")]) == [f"{tmp_path.name}/base", f"{tmp_path.name}/lora"]
    with pytest.raises(evaluate.ConfigError, match="lists x/a twice"):
        names(["x/a", "x/a/"])
    kept = evaluate.Kept(str(tmp_path), "settings")
    kept.put("a/selfaug", "w1", {"score": 1})
    kept.put("b/selfaug", "w2", {"score": 2})
    assert kept.get("a/selfaug", "w1") == {"score": 1} and kept.get("b/selfaug", "w2") == {"score": 2}
