"""`shortlvlm search`: the selection rule on synthetic arm results, the screen's pruning of an axis, the dev and test
sets kept apart, and a whole search resumed after an interruption (servers, scorers and timings faked: no vLLM)."""

from __future__ import annotations

import json
import random

import pytest

from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.benchmarks.base import Benchmark, Item
from shortlvlm_vllm.evaluation.matrix import Arm
from shortlvlm_vllm.search.select import BELOW, MEETS, UNCERTAIN, Candidate, Served, choose, finalists, margin
from shortlvlm_vllm.search.space import FULL, PAPER_DEFAULT, SearchConfig, lines
from shortlvlm_vllm.search.splits import DEV, TEST, Half, check_disjoint, dev_and_test

N = 400
FULL_RIGHT = [i % 20 != 0 for i in range(N)]  # 95%


def arm_correct(wrong_extra: int, seed: int = 1) -> list[bool]:
    """The full model's answers with `wrong_extra` of its right ones turned wrong."""
    right = [i for i, c in enumerate(FULL_RIGHT) if c]
    flipped = set(random.Random(seed).sample(right, wrong_extra))
    return [c and i not in flipped for i, c in enumerate(FULL_RIGHT)]


def served(name: str, layers: int, wrong_extra: int, speeds: tuple[float, ...], keep: float = 0.98) -> Served:
    return Served(name, layers, margin(arm_correct(wrong_extra), FULL_RIGHT, keep), speeds)


def test_margin_reads_the_target_with_its_interval():
    assert margin(FULL_RIGHT, FULL_RIGHT, 0.98).status == MEETS  # the full model keeps 100%
    close = margin(arm_correct(8), FULL_RIGHT, 0.98)  # 93% against 0.98 x 95% = 93.1%: inside the noise
    assert close.status == UNCERTAIN and close.low < 0 <= close.high
    far = margin(arm_correct(60), FULL_RIGHT, 0.98)
    assert far.status == BELOW and far.high < 0
    assert far.ratio == pytest.approx(far.accuracy / 0.95)
    assert far.margin == pytest.approx(far.accuracy - 0.98 * 0.95)
    with pytest.raises(ShortLVLMError, match="--keep"):
        margin(FULL_RIGHT, FULL_RIGHT, 1.5)


def test_the_fastest_arm_meeting_the_target_wins_whatever_the_order():
    arms = [served("slow-ok", 14, 0, (100.0, 101.0, 102.0)),
            served("fast-ok", 12, 1, (150.0, 151.0, 152.0)),
            served("fastest-but-below", 8, 80, (300.0, 301.0, 302.0)),
            served("fast-uncertain", 10, 8, (200.0, 201.0, 202.0))]
    for _ in range(5):
        random.shuffle(arms)
        winner, reasons = choose(arms, 0.98)
        assert winner.name == "fast-ok"
    assert "2 of 4 finalists meet" in reasons[0] and "fast-ok" in reasons[1]


def test_ties_go_to_fewer_layers_then_the_margin_then_the_name():
    # inside the best one's throughput noise (ranges overlap): fewer layers wins although its median is lower
    winner, reasons = choose([served("a-13", 13, 0, (150.0, 152.0, 154.0)),
                              served("b-12", 12, 1, (149.0, 151.0, 153.0))], 0.98)
    assert winner.name == "b-12" and "inside its throughput noise" in reasons[-1]
    # same layers and speeds: the larger margin's lower end, then the name
    winner, _ = choose([served("x", 12, 3, (150.0, 151.0)), served("y", 12, 0, (150.0, 151.0))], 0.98)
    assert winner.name == "y"
    winner, _ = choose([served("b", 12, 0, (150.0, 151.0)), served("a", 12, 0, (150.0, 151.0))], 0.98)
    assert winner.name == "a"
    # separated ranges are no tie: the faster one wins with more layers
    winner, _ = choose([served("more", 13, 0, (170.0, 171.0)), served("fewer", 12, 0, (150.0, 151.0))], 0.98)
    assert winner.name == "more"


def test_nothing_meeting_the_target_names_the_closest_arm_and_the_way_out():
    arms = [served("far", 8, 80, (300.0,)), served("closest", 12, 8, (150.0,)), served("farther", 6, 120, (400.0,))]
    with pytest.raises(ShortLVLMError) as caught:
        choose(arms, 0.98)
    message = str(caught.value)
    assert "Closest: closest" in message and "Lower --keep" in message and "400 questions" in message
    with pytest.raises(ShortLVLMError, match="no finalist was served"):
        choose([], 0.98)
    with pytest.raises(ShortLVLMError, match="--repeats"):
        choose([served("unmeasured", 12, 0, ())], 0.98)


def test_finalists_are_the_cheapest_survivors_with_a_safe_arm_among_them():
    def candidate(name, layers, wrong, quantized=False):
        return Candidate(name, layers, margin(arm_correct(wrong), FULL_RIGHT, 0.98), quantized=quantized)

    pool = [candidate("below-8", 8, 80), candidate("unsure-10", 10, 8), candidate("unsure-11", 11, 8),
            candidate("ok-13", 13, 0), candidate("ok-12", 12, 0), Candidate("w4-11", 11, None, quantized=True)]
    assert [c.name for c in finalists(pool, 2)] == ["unsure-10", "ok-12"]  # the cheapest meeting arm replaces one
    assert [c.name for c in finalists(pool, 4)] == ["unsure-10", "w4-11", "unsure-11", "ok-12"]
    with pytest.raises(ShortLVLMError, match="--finalists"):
        finalists(pool, 0)


def test_lines_group_arms_by_everything_but_the_ratio_screenable_first():
    config = SearchConfig(ratios=[0.4, 0.2], localize=["tis"], compensate=["none"], quantize=["none", "gptq"])
    grouped = lines(config.arms())
    assert [[a.name for a in line] for line in grouped] == [
        ["tis+none-20%", "tis+none-40%"], ["tis+scp-30%"], ["tis+none-20%+gptq", "tis+none-40%+gptq"], ["full+gptq"]]
    assert PAPER_DEFAULT in config.arms() and FULL not in config.arms()
    with pytest.raises(ShortLVLMError, match="exceed --max-ratio"):
        SearchConfig(ratios=[0.6])


def test_the_synthetic_dev_and_test_sets_share_no_question_and_no_image():
    import hashlib
    import io

    dev, test = dev_and_test("synthetic")
    dev_items, test_items = dev.load(limit=60), test.load(limit=60)
    check_disjoint(dev_items, test_items)
    assert all(i.id.startswith("validation-") for i in dev_items) and all(i.id.startswith("test-") for i in test_items)

    def digest(item):
        buffer = io.BytesIO()
        item.image.save(buffer, format="PNG")
        return hashlib.sha256(buffer.getvalue()).hexdigest()

    assert {digest(i) for i in dev_items}.isdisjoint(digest(i) for i in test_items)
    with pytest.raises(ShortLVLMError, match="share 2 question ids"):
        check_disjoint(dev_items[:2], dev_items[:5])
    dev, test = dev_and_test("synthetic-v1")  # the first toy's scenes keep their splits
    assert (dev.split, dev.version, test.split, test.version) == ("validation", 1, "test", 1)


class Numbered(Benchmark):
    """A benchmark of `n` questions, in circular groups of 4 rotations from `grouped` on."""

    name, hub_id = "numbered", "none"

    def load(self, source=None, limit=None, seed=0):
        from PIL import Image

        image = Image.new("RGB", (4, 4))
        return [Item(f"q{i}", image, "?", "a", {"group": f"g{i // 4}"}) for i in range(200)][:limit]

    def parse(self, item, reply):
        return reply

    def score(self, items, parsed):
        return {}


def test_another_benchmark_is_halved_by_its_question_units():
    base = Numbered()
    dev, test = Half(base, DEV).load(), Half(base, TEST).load()
    assert len(dev) + len(test) == 200 and 60 < len(dev) < 140
    check_disjoint(dev, test)
    groups = {side: {i.meta["group"] for i in items} for side, items in ((DEV, dev), (TEST, test))}
    assert groups[DEV].isdisjoint(groups[TEST])  # a circular group's rotations stay on one side
    assert Half(base, DEV).load(limit=7) == dev[:7]


def _result(arm: Arm, correct: list[bool]) -> dict:
    from dataclasses import asdict

    return {**asdict(arm), "arm": arm.name, "layers": 16 - round(arm.ratio * 16), "pruned_layers": [],
            "weights_key": arm.name, "units": {"ids_sha256": "x", "correct": "".join("01"[c] for c in correct)},
            "throughput_key": f"{16 - round(arm.ratio * 16)}-layers", "heldout_drift": None,
            "accuracy": {"accuracy": sum(correct) / len(correct)}}


def test_the_screen_stops_a_line_once_a_ratio_falls_clearly_below(tmp_path):
    from shortlvlm_vllm.search.screen import screen

    class FakeMatrix:
        out = tmp_path
        asked: list[str] = []

        def measure_accuracy(self, arm, measured=()):
            self.asked.append(arm.name)
            wrong = {0.0: 0, 0.2: 0, 0.3: 80 if arm.localize == "last" else 1, 0.4: 2}[arm.ratio]
            return _result(arm, arm_correct(wrong))

    config = SearchConfig(ratios=[0.2, 0.3, 0.4], localize=["tis", "last"], compensate=["none"],
                          quantize=["none", "gptq"])
    matrix = FakeMatrix()
    full, decisions = screen(matrix, config.arms(), 0.98)
    by_name = {d.arm.name: d for d in decisions}
    assert "last+none-40%" not in matrix.asked and by_name["last+none-40%"].decision == "not tried"
    assert by_name["last+none-30%"].decision == "dropped" and by_name["tis+none-40%"].decision == "candidate"
    assert by_name["last+none-30%+gptq"].decision == "dropped"  # stacks on a dropped arm: never served
    assert by_name["tis+none-30%+gptq"].decision == "candidate" and "gptq" not in " ".join(matrix.asked)
    assert len(matrix.asked) == 1 + 6  # the full model and the six screenable arms tried (paper default too)
    assert (tmp_path / "results.md").is_file()


def test_the_time_cap_stops_new_arms_but_reads_back_measured_ones(tmp_path):
    import time

    from shortlvlm_vllm.search.screen import screen

    done = Arm(0.2, "tis", "none", "none")
    (tmp_path / "arms" / done.slug).mkdir(parents=True)
    (tmp_path / "arms" / done.slug / "result.json").write_text("{}")

    class FakeMatrix:
        out = tmp_path
        asked: list[str] = []

        def measure_accuracy(self, arm, measured=()):
            self.asked.append(arm.name)
            return _result(arm, FULL_RIGHT)

    config = SearchConfig(ratios=[0.2, 0.3], localize=["tis"], compensate=["none"])
    _, decisions = screen(FakeMatrix(), config.arms(), 0.98, deadline=time.monotonic() - 1)
    assert FakeMatrix.asked == ["full", "tis+none-20%"]
    assert {d.arm.name: d.reason for d in decisions if d.decision == "not tried"} == {
        "tis+none-30%": "the search's time cap (--max-minutes) was reached",
        "tis+scp-30%": "the search's time cap (--max-minutes) was reached"}


@pytest.fixture
def fake_serving(monkeypatch):
    """vLLM servers, the served client, transformers' answers and bench replaced by fakes; arms with half the layers
    pruned answer a third of the questions wrong, the others every one right; throughput = 1000 / layers."""
    from shortlvlm_vllm.evaluation import client, reference, throughput
    from shortlvlm_vllm.serving import launcher

    calls = {"servers": 0, "answered": [], "fail_after": None}

    class FakeServer:
        def __init__(self, model, *, served_model_name, log_path, **kwargs):
            calls["servers"] += 1
            layers = json.loads((model / "config.json").read_text())["text_config"]["num_hidden_layers"]
            self.base_url, self.api_key = f"http://layers-{layers}/v1", "EMPTY"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def answer(benchmark, out, name, items):
        if calls["fail_after"] is not None and len(calls["answered"]) >= calls["fail_after"]:
            raise KeyboardInterrupt("interrupted by the test")
        calls["answered"].append((out.parent.parent.parent.name, name))
        out.mkdir(parents=True, exist_ok=True)
        wrong = name.endswith("-50%")
        records = {item.id: client.answer_record(benchmark, item, "no" if wrong and k % 3 == 0 else item.answer)
                   for k, item in enumerate(items)}
        (out / client.RECORDS_NAME).write_text("".join(json.dumps(r) + "\n" for r in records.values()))
        return client.write_scores(out, benchmark, name, items, records)

    def fake_transformers(model_dir, benchmark, out, *, model_name, source, limit, seed, batch_size):
        return answer(benchmark, out, model_name, benchmark.load(source, limit, seed))

    def fake_eval(endpoints, benchmark, out, *, source, limit, seed, config):
        return answer(benchmark, out, endpoints[0].model, benchmark.load(source, limit, seed))

    def fake_bench(endpoints, requests, **kwargs):
        layers = int(endpoints[0].base_url.split("-")[1].split("/")[0])
        return throughput.summarize([throughput.RequestTiming(1.0, 0.1, (0.1,), 10, 2)], 2 * layers / 1000,
                                    output_len=2)

    monkeypatch.setattr(launcher, "VLLMServer", FakeServer)
    monkeypatch.setattr(client, "run_benchmark", fake_eval)
    monkeypatch.setattr(reference, "score_with_transformers", fake_transformers)
    monkeypatch.setattr(throughput, "run_throughput", fake_bench)
    return calls


def test_a_search_resumes_after_an_interruption_and_reports(tiny_llava, tmp_path, fake_serving):
    from shortlvlm_vllm.search.driver import Search

    config = SearchConfig(model=str(tiny_llava), ratios=[0.25, 0.5], localize=["tis", "last"],
                          compensate=["none", "scp"], num_samples=12, heldout=2, rank=4, dev_limit=30, test_limit=20,
                          finalists=2, repeats=2, batch_size=4)
    out = tmp_path / "search"
    fake_serving["fail_after"] = 3
    with pytest.raises(KeyboardInterrupt):
        Search(config, out).run()
    first = list(fake_serving["answered"])
    assert len(first) == 3 and not (out / "report.json").exists()
    fake_serving["fail_after"] = None
    document = Search(config, out).run()
    rerun = fake_serving["answered"][3:]
    assert not set(first) & set(rerun)  # nothing answered before is asked again
    assert document["winner"]["arm"].endswith("-25%")  # the arms at 50% lose a third of the answers
    assert document["winner"]["dev_vllm"]["status"] == "meets" and document["winner"]["test_vllm"]["kept"] == 1.0
    assert {a["arm"]: a["decision"] for a in document["arms"]}["tis+none-50%"] == "dropped"
    assert document["paper_default"]["arm"] == "tis+scp-30%"
    # the fake rounds have no spread: fewer layers are faster, beyond any noise
    assert document["winner"]["speedup_vs_full"] > 1 and document["winner"]["speedup_inside_noise"] is False
    cost = document["cost"]
    assert cost["search"]["servers"]["total"] == fake_serving["servers"]
    assert cost["full_matrix_estimate"]["arms"] == len(config.arms()) + 1
    assert (out / "chosen" / "short_lvlm_recipe.yaml").is_file() and (out / "accuracy_vs_throughput.png").is_file()
    assert "Chosen:" in (out / "report.md").read_text() and "tis+none-50%" in (out / "arms.md").read_text()
    servers = fake_serving["servers"]
    Search(config, out).run()  # finished: everything is read back
    assert fake_serving["servers"] == servers
    with pytest.raises(ShortLVLMError, match="other settings \\(keep\\)"):
        Search(SearchConfig(**{**config.__dict__, "keep": 0.9}), out).run()
    wider = Search(SearchConfig(**{**config.__dict__, "finalists": 3}), out).run()  # one more arm served
    assert len([a for a in wider["arms"] if a.get("dev_vllm")]) == 3
