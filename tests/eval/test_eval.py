"""Stage 3: IFEval scoring on hand-written responses, the answer matcher, drift, report and plots."""
import json
import os

import pytest
import torch

from conftest import tiny_config
from selfaug import train
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


def test_drift_of_a_model_against_itself_is_zero_and_positive_otherwise():
    model = load_model("builtin:tiny-llama")
    seqs = [[1, 5, 9, 200, 7], [3, 4, 5]]
    assert abs(evaluate.drift(model, model, seqs)[0]) < 1e-7
    other = load_model("builtin:tiny-llama")
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.add_(0.5)
    mean, per = evaluate.drift(model, other, seqs)
    assert mean > 1e-4 and len(per) == len(seqs) and sum(s for s, _ in per) / sum(n for _, n in per) == pytest.approx(mean)


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
