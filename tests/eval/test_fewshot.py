"""Few-shot evaluation: prompts token by token, demonstration selection, the shuffled-image
control, post-processing, scores through the metrics, and beam search."""

from __future__ import annotations

import dataclasses
import itertools
import math
import shutil
from pathlib import Path

import pytest
import torch

from mm1.config import ConnectorConfig, DecoderConfig, EvalConfig, ModelConfig, VisionConfig
from mm1.data.images import ImageProcessor
from mm1.data.prompt_format import PromptFormat
from mm1.data.tokenizer import Tokenizer
from mm1.eval import fewshot
from mm1.eval.demos import random_demos, rices_rank, shuffled_images
from mm1.eval.fewshot import FewShotEvaluator, evaluate
from mm1.eval.metrics import caption_scores, cider, ptb_tokenize_corpus, vqa_accuracy_corpus
from mm1.eval.prompts import PromptTemplates, build_prompt, postprocess
from mm1.eval.tasks import CaptionTask, Example, Task, TaskSpec, VQATask, load_task
from mm1.models.generation import generate, generate_beam
from mm1.models.mllm import MM1

Q = 4  # image tokens per image of the tiny model


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, world_copy) -> Path:
    """The tiny synthetic world (a copy of the session's)."""
    root = world_copy(tmp_path_factory.mktemp("world"))
    return root


@pytest.fixture(scope="module")
def tok(world: Path) -> Tokenizer:
    return Tokenizer.from_file(world / "tokenizer.json")


def tiny_model(
    tok: Tokenizer, seed: int = 0, vocab: int | None = None, init_std: float = 0.02
) -> MM1:
    cfg = ModelConfig(
        vision=VisionConfig(
            image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, act="gelu"
        ),
        connector=ConnectorConfig(type="avgpool", num_tokens=Q),
        decoder=DecoderConfig(
            vocab_size=vocab or tok.vocab_size,
            dim=32,
            layers=2,
            heads=4,
            kv_heads=2,
            ffn_dim=64,
            max_seq_len=1024,
        ),
        image_token_id=tok.image_id if vocab is None else vocab - 1,
        init_std=init_std,
    )
    torch.manual_seed(seed)
    return MM1(cfg).eval()


@pytest.fixture(scope="module")
def model(tok: Tokenizer) -> MM1:
    return tiny_model(tok)


@pytest.fixture(scope="module")
def proc() -> ImageProcessor:
    return ImageProcessor.clip(32)


@pytest.fixture(scope="module")
def tasks(world: Path) -> dict[str, Task]:
    return {name: load_task(name, world=world) for name in ("synth_coco", "synth_vqa")}


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def ex(
    i: int, question: str | None = None, target: str = "a red circle", image: str = ""
) -> Example:
    return Example(str(i), str(i), Path(image or f"/img/{i}.jpg"), (target,), target, question)


def test_caption_prompt_token_by_token(tok: Tokenizer) -> None:
    demos = [ex(1, target="a red circle."), ex(2, target="two blue squares")]
    query = ex(3)
    p = build_prompt(tok, PromptFormat(Q), "caption", demos, query)
    assert p.text == (
        "<image>Output:a red circle.<|endofchunk|>\n<image>Output:two blue squares<|endofchunk|>\n"
        "<image>Output:"
    )  # each demonstration followed by a newline, as OpenFlamingo joins them
    img = [tok.image_id] * Q
    eoc = tok.endofchunk_id
    expected = [
        tok.bos_id,
        *img,
        *tok.encode("Output:a red circle."),
        eoc,
        *tok.encode("\n"),
        *img,
        *tok.encode("Output:two blue squares"),
        eoc,
        *tok.encode("\n"),
        *img,
        *tok.encode("Output:"),
    ]
    assert p.input_ids == expected
    assert p.input_ids.count(tok.image_id) == 3 * Q  # images x Q
    assert p.images == [Path("/img/1.jpg"), Path("/img/2.jpg"), Path("/img/3.jpg")]


def test_vqa_prompt_and_text_only_demos(tok: Tokenizer) -> None:
    demos = [ex(1, "What color is it?", "red"), ex(2, "How many?", "2")]
    query = ex(3, "What shape?")
    p = build_prompt(tok, PromptFormat(Q), "vqa", demos, query, query_image=Path("/other.jpg"))
    assert p.text == (
        "<image>Question:What color is it? Short answer:red<|endofchunk|>\n"
        "<image>Question:How many? Short answer:2<|endofchunk|>\n"
        "<image>Question:What shape? Short answer:"
    )
    assert p.input_ids.count(tok.image_id) == 3 * Q
    assert p.images[-1] == Path("/other.jpg")  # the shuffled control replaces the query image
    # zero-shot: the demonstrations lose their images, the query keeps its own
    z = build_prompt(tok, PromptFormat(Q), "vqa", demos, query, text_only_demos=True)
    assert z.text == (
        "Question:What color is it? Short answer:red<|endofchunk|>\n"
        "Question:How many? Short answer:2<|endofchunk|>\n"
        "<image>Question:What shape? Short answer:"
    )
    ids = [tok.bos_id, *tok.encode("Question:What color is it? Short answer:red")]
    assert z.input_ids[: len(ids)] == ids
    assert z.input_ids.count(tok.image_id) == Q and z.images == [Path("/img/3.jpg")]
    # image boundaries wrap each image's slots
    b = build_prompt(tok, PromptFormat(Q, image_boundaries=True), "vqa", [], query)
    assert b.input_ids[:7] == [tok.bos_id, tok.boi_id, *[tok.image_id] * Q, tok.eoi_id]
    with pytest.raises(ValueError, match="exactly one"):
        PromptTemplates(caption="<image>Output:")


def test_postprocess() -> None:
    """OpenFlamingo's rules (`postprocess_vqa_generation`, `postprocess_captioning_generation`
    plus its quote removal); case is the metric's business."""
    assert postprocess("  Blue<|endofchunk|>Question: what", "vqa") == "Blue"
    assert postprocess(" Two\nQuestion:", "vqa") == "Two"
    assert postprocess("red, white", "vqa") == "red"
    assert postprocess("blue Short answer: red", "vqa") == "blue"
    assert postprocess("yes Answer: no", "vqa") == "yes"
    assert postprocess('A "Red" circle.\nOutput:', "caption") == "A Red circle."
    assert postprocess("a dog Output a cat", "caption") == "a dog"
    assert postprocess(" yes Question:x", "vqa", ("\n", "Question:")) == "yes"


# ---------------------------------------------------------------------------------------------
# Demonstrations
# ---------------------------------------------------------------------------------------------


def test_random_demos_exclude_the_query_and_follow_the_seed(tasks: dict[str, Task]) -> None:
    vqa = tasks["synth_vqa"]
    # the hard case: the support split IS the query split (3 questions share each image)
    support = vqa.query
    for q in vqa.query[:40]:
        demos = random_demos(support, q, 8, seed=0, key="t")
        assert len({d.id for d in demos}) == 8
        assert all(d.image != q.image for d in demos)
        assert demos == random_demos(support, q, 8, seed=0, key="t")  # reproducible
    q = vqa.query[0]
    by_seed = [tuple(d.id for d in random_demos(support, q, 4, seed=s)) for s in range(5)]
    assert len(set(by_seed)) == 5  # different seeds, different demonstrations
    with pytest.raises(ValueError, match="only 3"):
        random_demos(support[:6], q, 4, seed=0)  # 6 questions, 3 of them on the query's image


def test_rices_rank_crafted_features() -> None:
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    support = torch.tensor([[0.0, 1.0], [0.9, 0.1], [1.0, 0.05], [-1.0, 0.0], [0.3, 0.7]])
    ranks = rices_rank(query, support, 2)
    assert ranks == [[1, 2], [4, 0]]  # most similar last, next to the query
    assert rices_rank(query, support, 2, exclude=[{2}, {0}]) == [[4, 1], [1, 4]]
    with pytest.raises(ValueError, match="fewer than 3"):
        rices_rank(query, support[:3], 3, exclude=[{0}, set()])


def test_rices_picks_the_copy_of_the_query_image(
    tasks: dict[str, Task], tmp_path: Path, model: MM1, tok: Tokenizer, proc: ImageProcessor
) -> None:
    base = tasks["synth_coco"]
    queries = base.query[:4]
    copies = []
    for q in queries:  # the same pixels under another name: cosine similarity 1
        dst = tmp_path / f"copy_{q.image.name}"
        shutil.copy(q.image, dst)
        copies.append(dataclasses.replace(q, id=f"copy{q.id}", image=dst))
    task = CaptionTask("rices", queries, base.support + copies)
    ev = FewShotEvaluator(model, tok, proc, demo_selection="rices")
    demos = ev.select_demos(task, queries, [q.image for q in queries], 3, seed=0, key="3")
    for q, c, d in zip(queries, copies, demos):
        assert d[-1].id == c.id and q.id not in {e.id for e in d}
    # the shuffled control retrieves by the image actually shown
    shown = [queries[1].image, queries[2].image, queries[3].image, queries[0].image]
    demos = ev.select_demos(task, queries, shown, 3, seed=0, key="3")
    assert [d[-1].id for d in demos] == ["copy2", "copy3", "copy4", "copy1"]


def test_shuffled_images_is_a_derangement(tasks: dict[str, Task]) -> None:
    queries = tasks["synth_vqa"].query
    shown = shuffled_images(queries)
    assert all(shown[q.id] != q.image for q in queries)
    assert set(shown.values()) == {q.image for q in queries}  # every image still shown
    # questions about the same image see the same wrong image
    by_image: dict[Path, set[Path]] = {}
    for q in queries:
        by_image.setdefault(q.image, set()).add(shown[q.id])
    assert all(len(v) == 1 for v in by_image.values())
    with pytest.raises(ValueError, match="two distinct"):
        shuffled_images(queries[:3])


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def test_evaluate_structure_and_scores_match_the_metrics(
    model: MM1, tok: Tokenizer, proc: ImageProcessor, world: Path, tasks: dict[str, Task]
) -> None:
    r = evaluate(
        model,
        tok,
        proc,
        EvalConfig(shots=[0, 4], seeds=2, max_examples=8, batch_size=5, max_new_tokens=8),
        tasks=["synth_coco", "synth_vqa"],
        world=world,
        progress=False,
    )
    for name in ("synth_coco", "synth_vqa"):
        entry = r["tasks"][name]
        assert entry["num_queries"] == 8 and entry["subset"] and entry["total_queries"] > 8
        assert entry["shots"]["0"]["text_demos"] and entry["zero_shot_plain"] is not None
        for k in ("0", "4"):
            cell = entry["shots"][k]
            assert cell["seeds"] == [0, 1] and len(cell["scores"]) == 2
            assert cell["mean"] == pytest.approx(sum(cell["scores"]) / 2)
            assert cell["std"] == pytest.approx(abs(cell["scores"][0] - cell["scores"][1]) / 2)
            for i, seed in enumerate(("0", "1")):
                recs = r["predictions"][name][k][seed]
                assert [x["id"] for x in recs] == [e.id for e in tasks[name].query[:8]]
                assert all(len(x["demos"]) == (2 if k == "0" else 4) for x in recs)
                preds = {x["id"]: x["prediction"] for x in recs}
                refs = {x["id"]: x["references"] for x in recs}
                if name == "synth_coco":  # CIDEr over exactly the 8 queries evaluated
                    direct = 100 * caption_scores(refs, preds)["CIDEr"]
                else:
                    direct = vqa_accuracy_corpus(preds, refs)[0]
                assert cell["scores"][i] == pytest.approx(direct, abs=1e-9)
        # demonstrations come from the support split and never show the query's image
        support = {e.id: e for e in tasks[name].support}
        for x in r["predictions"][name]["4"]["0"]:
            assert all(support[d].image != Path(x["query_image"]) for d in x["demos"])
        assert r["predictions"][name]["4"]["0"] != r["predictions"][name]["4"]["1"]
        assert len(r["predictions"][name]["0_plain"]["-"]) == 8
    for k in ("0", "4"):
        means = [r["tasks"][t]["shots"][k]["mean"] for t in ("synth_coco", "synth_vqa")]
        assert r["average"][k] == pytest.approx(sum(means) / 2)
    assert r["average"]["overall"] == pytest.approx((r["average"]["0"] + r["average"]["4"]) / 2)
    assert r["config"]["max_examples"] == 8 and r["timing"]["generations"] == 2 * 8 * 5
    assert r["config"]["max_new_tokens"] == {"caption": 8, "vqa": 5}


def _feed(tok: Tokenizer, texts: list[str]):
    """A stand-in for `generate` that answers `texts` in order, then <|endofchunk|>."""
    answers = iter(texts)

    def fake_generate(model, prompts, pixel_values=None, **kwargs):
        assert pixel_values.shape[0] * Q == sum(p.count(tok.image_id) for p in prompts)
        out = []
        for _ in prompts:
            ids = [*tok.encode(next(answers)), tok.endofchunk_id, *tok.encode("junk")]
            out.append(ids[: kwargs["max_new_tokens"] + 20])
        return out

    return fake_generate


def test_perfect_captions_score_the_cider_of_the_references(
    model: MM1,
    tok: Tokenizer,
    proc: ImageProcessor,
    tasks: dict[str, Task],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    task = tasks["synth_coco"]
    queries = task.query[:10]
    monkeypatch.setattr(fewshot, "generate", _feed(tok, [" " + q.target for q in queries]))
    r = evaluate(
        model,
        tok,
        proc,
        EvalConfig(shots=[0], seeds=1, zero_shot_text_demos=False, max_examples=10, batch_size=4),
        tasks=[task],
        progress=False,
    )
    refs = ptb_tokenize_corpus({q.id: list(q.references) for q in queries})
    cands = ptb_tokenize_corpus({q.id: [q.target] for q in queries})
    expected = 100 * cider(refs, {k: v[0] for k, v in cands.items()})[0]
    assert r["tasks"]["synth_coco"]["shots"]["0"]["scores"] == [pytest.approx(expected, abs=1e-9)]
    assert expected > 100
    recs = r["predictions"]["synth_coco"]["0"]["0"]
    # OpenFlamingo drops double quotes from captions (PTB tokenization drops them anyway)
    assert [x["prediction"] for x in recs] == [q.target.replace('"', "") for q in queries]
    assert "junk" in recs[0]["raw"] and "<|endofchunk|>" in recs[0]["raw"]


def test_vqa_answers_are_post_processed_before_scoring(
    model: MM1,
    tok: Tokenizer,
    proc: ImageProcessor,
    tasks: dict[str, Task],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    task = tasks["synth_vqa"]
    queries = task.query[:8]
    # OpenFlamingo's cuts: a new example started without <|endofchunk|>, "Short answer", ", "
    tails = ("Question:what", " Short answer: no", ", and more")
    answers = [f" {q.target}{tails[i % 3]}" for i, q in enumerate(queries)]
    monkeypatch.setattr(fewshot, "generate", _feed(tok, answers))
    r = evaluate(
        model,
        tok,
        proc,
        EvalConfig(shots=[0], seeds=1, zero_shot_text_demos=False, max_examples=8),
        tasks=[task],
        progress=False,
    )
    recs = r["predictions"]["synth_vqa"]["0"]["0"]
    assert [x["prediction"] for x in recs] == [q.target for q in queries]
    expected = vqa_accuracy_corpus(
        {q.id: q.target for q in queries}, {q.id: list(q.references) for q in queries}
    )[0]
    assert r["tasks"]["synth_vqa"]["shots"]["0"]["mean"] == expected > 50


def test_shuffle_control_and_rices_in_evaluate(
    model: MM1, tok: Tokenizer, proc: ImageProcessor, world: Path
) -> None:
    r = evaluate(
        model,
        tok,
        proc,
        EvalConfig(shots=[2], seeds=3, max_examples=9, shuffle_images=True, demo_selection="rices"),
        tasks=["synth_vqa"],
        world=world,
        progress=False,
    )
    recs = r["predictions"]["synth_vqa"]["2"]["0"]
    assert all(x["image"] != x["query_image"] for x in recs)
    assert r["config"]["shuffle_images"] and r["config"]["seeds"] == [0]  # RICES ignores seeds
    assert r["tasks"]["synth_vqa"]["shots"]["2"]["std"] == 0.0
    assert r["tasks"]["synth_vqa"]["zero_shot_plain"] is None


def test_evaluate_errors(
    model: MM1, tok: Tokenizer, proc: ImageProcessor, tasks: dict[str, Task]
) -> None:
    no_support = VQATask("nosupport", tasks["synth_vqa"].query[:4])
    with pytest.raises(ValueError, match="no support split"):
        evaluate(
            model, tok, proc, EvalConfig(shots=[4], seeds=1), tasks=[no_support], progress=False
        )
    # plain zero-shot runs without a support split
    r = evaluate(
        model, tok, proc, EvalConfig(shots=[0], seeds=3), tasks=[no_support], progress=False
    )
    cell = r["tasks"]["nosupport"]["shots"]["0"]
    assert not cell["text_demos"] and cell["seeds"] == [0] and cell["std"] == 0.0  # seed-free
    other = tiny_model(tok, vocab=tok.vocab_size + 1)  # <image> on another id
    with pytest.raises(ValueError, match="does not belong"):
        evaluate(other, tok, proc, EvalConfig(shots=[0]), tasks=[no_support], progress=False)


def test_compiled_greedy_eval_predicts_what_eager_does(
    model: MM1, tok: Tokenizer, proc: ImageProcessor, world: Path
) -> None:
    """`eval.compile=true`: every prediction as eager greedy decoding gives (batches of 5 and
    3, 0- and 4-shot prompts: several shapes through one compiled step); beam search refuses."""
    from mm1.config import ConfigError

    def run(cfg: EvalConfig) -> dict:
        r = evaluate(model, tok, proc, cfg, tasks=["synth_vqa"], world=world, progress=False)
        return r["predictions"]["synth_vqa"]

    cfg = EvalConfig(shots=[0, 4], seeds=1, max_examples=8, batch_size=5)
    eager = run(cfg)
    raw = {x["raw"] for cells in eager.values() for recs in cells.values() for x in recs}
    assert len(raw) > 4, "the decoded texts hardly differ: a mix-up would not show"
    assert run(dataclasses.replace(cfg, compile=True)) == eager
    with pytest.raises(ConfigError, match="eval.compile compiles greedy decoding"):
        run(dataclasses.replace(cfg, compile=True, num_beams=3))


def test_beam_search_in_evaluate(
    model: MM1,
    tok: Tokenizer,
    proc: ImageProcessor,
    world: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[dict, list[list[int]]]] = []

    def spy(*args: object, **kwargs: object) -> list[list[int]]:
        outs = generate_beam(*args, **kwargs)
        calls.append((kwargs, outs))
        return outs

    monkeypatch.setattr(fewshot, "generate_beam", spy)

    def run(num_beams: int) -> dict:
        cfg = EvalConfig(shots=[2], seeds=1, max_examples=6, num_beams=num_beams)
        return evaluate(model, tok, proc, cfg, tasks=["synth_coco"], world=world, progress=False)

    greedy = run(1)
    assert calls == [], "one beam is greedy decoding, not a beam search"
    beam3 = run(3)
    assert beam3["config"]["decoding"] == "beam search (3 beams)"
    assert calls and all(kwargs["num_beams"] == 3 for kwargs, _ in calls)
    # the predictions are the beam search's own outputs, in order
    raw = [tok.decode(out, skip_special_tokens=False) for _, outs in calls for out in outs]
    assert [x["raw"] for x in beam3["predictions"]["synth_coco"]["2"]["0"]] == raw
    assert len(raw) == len(greedy["predictions"]["synth_coco"]["2"]["0"]) == 6


# ---------------------------------------------------------------------------------------------
# Beam search (`generate_beam`)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _sequence_logprob(m: MM1, prompt: list[int], seq: list[int]) -> float:
    ids = torch.tensor([prompt + seq])
    logp = m.decoder(ids)[0].float().log_softmax(-1)  # text only: every id is a text token
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(seq))


def test_generate_beam_with_one_beam_is_greedy(tok: Tokenizer) -> None:
    m = tiny_model(tok, seed=1, vocab=50, init_std=0.3)  # peaky logits: no near-ties
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 48, (n,), generator=gen).tolist() for n in (5, 9, 3)]
    for eos in ([], [7, 11, 23]):
        greedy = generate(m, prompts, max_new_tokens=8, eos_token_id=eos)
        for lp in (1.0, 0.0, -1.0):
            beam = generate_beam(
                m, prompts, num_beams=1, max_new_tokens=8, eos_token_id=eos, length_penalty=lp
            )
            assert beam == greedy
    assert generate_beam(m, prompts, max_new_tokens=0) == [[], [], []]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_generate_beam_matches_exhaustive_search(tok: Tokenizer, length_penalty: float) -> None:
    vocab, eos, steps = 6, 2, 2
    m = tiny_model(tok, seed=3, vocab=vocab, init_std=0.5)
    prompts = [[0, 1, 3], [4, 4], [1]]
    # vocab beams over 2 steps cover every sequence: beam search = exhaustive search
    beams = generate_beam(
        m,
        prompts,
        num_beams=vocab,
        max_new_tokens=steps,
        eos_token_id=eos,
        length_penalty=length_penalty,
    )
    for prompt, got in zip(prompts, beams):
        candidates = [[eos]] + [
            [a, b] for a, b in itertools.product(range(vocab), repeat=2) if a != eos
        ]

        def score(seq: list[int], prompt: list[int] = prompt) -> float:
            return _sequence_logprob(m, prompt, seq) / len(seq) ** length_penalty

        best = max(candidates, key=score)
        assert score(got) == pytest.approx(score(best), abs=1e-5)
        assert got == best or math.isclose(score(got), score(best), abs_tol=1e-5)
    # fewer beams on the same problem can only do as well or worse, never better
    small = generate_beam(
        m,
        prompts,
        num_beams=2,
        max_new_tokens=steps,
        eos_token_id=eos,
        length_penalty=length_penalty,
    )
    for prompt, got, best in zip(prompts, small, beams):
        s_small = _sequence_logprob(m, prompt, got) / len(got) ** length_penalty
        s_best = _sequence_logprob(m, prompt, best) / len(best) ** length_penalty
        assert s_small <= s_best + 1e-5


def test_generate_beam_deeper_exhaustive(tok: Tokenizer) -> None:
    vocab, eos, steps = 4, 1, 3
    m = tiny_model(tok, seed=5, vocab=vocab, init_std=0.5)
    prompt = [0, 2]
    # vocab**2 beams keep every 2-token prefix, so the best 3-token sequence is always found
    (got,) = generate_beam(
        m, [prompt], num_beams=vocab**2, max_new_tokens=steps, eos_token_id=eos, length_penalty=1.0
    )
    seqs = []
    for n in range(1, steps + 1):
        for seq in itertools.product(range(vocab), repeat=n):
            if eos not in seq[:-1] and (seq[-1] == eos or n == steps):
                seqs.append(list(seq))
    best = max(seqs, key=lambda s: _sequence_logprob(m, prompt, s) / len(s))
    assert got == best


def _reference_beam(
    m: MM1, prompt: list[int], k: int, steps: int, eos: int, lp: float
) -> list[int]:
    """Plain beam search, recomputing every prefix (no cache): HF's semantics (2k candidates per
    step, ended hypotheses kept aside, done once k have ended and no open beam beats the worst)."""
    beams: list[tuple[float, list[int]]] = [(0.0, [])]
    ended: list[tuple[float, list[int]]] = []
    for step in range(steps):
        cands = []
        for score, seq in beams:
            with torch.no_grad():
                logp = m.decoder(torch.tensor([prompt + seq]))[0, -1].float().log_softmax(-1)
            cands += [(score + float(logp[t]), [*seq, t]) for t in range(logp.shape[0])]
        cands.sort(key=lambda c: -c[0])
        beams = []
        for score, seq in cands[: 2 * k]:
            if len(beams) == k:
                break
            if seq[-1] == eos:
                ended.append((score / (step + 1) ** lp, seq))
            else:
                beams.append((score, seq))
        ended = sorted(ended, key=lambda e: -e[0])[:k]
        if not beams or (len(ended) >= k and beams[0][0] / (step + 1) ** lp <= ended[-1][0]):
            return ended[0][1]
    ended += [(score / steps**lp, seq) for score, seq in beams]
    return max(ended, key=lambda e: e[0])[1]


def test_generate_beam_matches_a_reference_beam_search(tok: Tokenizer) -> None:
    vocab, eos, steps = 7, 3, 4
    m = tiny_model(tok, seed=11, vocab=vocab, init_std=0.3)
    with torch.no_grad():  # a likely EOS, so hypotheses of different lengths compete
        w = m.decoder.lm_head.weight
        w[eos] = 2.0 * w[[t for t in range(vocab) if t != eos]].mean(0)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab - 1, (n,), generator=gen).tolist() for n in range(1, 7)]
    ended_early = 0
    for k, lp in [(2, 1.0), (3, 0.5), (2, 0.0), (3, -1.0)]:
        got = generate_beam(
            m, prompts, num_beams=k, max_new_tokens=steps, eos_token_id=eos, length_penalty=lp
        )
        want = [_reference_beam(m, p, k, steps, eos, lp) for p in prompts]
        assert got == want, (k, lp)
        ended_early += sum(len(g) < steps for g in got)
    assert ended_early >= 4  # the case exercises hypotheses that end before max_new_tokens


def test_a_task_can_set_its_own_answer_length(
    model: MM1,
    tok: Tokenizer,
    proc: ImageProcessor,
    tasks: dict[str, Task],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OpenFlamingo gives TextVQA 10 new tokens where VQA has 5: a task file's
    `max_new_tokens` overrides the kind's default for that task only."""
    import dataclasses

    asked: list[int] = []
    feed = _feed(tok, ["red"] * 8)

    def spy(model, prompts, pixel_values=None, **kwargs):
        asked.append(kwargs["max_new_tokens"])
        return feed(model, prompts, pixel_values, **kwargs)

    monkeypatch.setattr(fewshot, "generate", spy)
    long_vqa = dataclasses.replace(tasks["synth_vqa"], name="long_vqa", max_new_tokens=10)
    r = evaluate(
        model,
        tok,
        proc,
        EvalConfig(shots=[0], seeds=1, zero_shot_text_demos=False, max_examples=4, batch_size=4),
        tasks=[tasks["synth_vqa"], long_vqa],
        progress=False,
    )
    assert asked == [5, 10]
    assert r["tasks"]["long_vqa"]["max_new_tokens"] == 10
    spec = TaskSpec.from_dict(
        {
            "name": "t",
            "kind": "vqa",
            "max_new_tokens": 10,
            "query": {"questions": "q.json", "annotations": "a.json", "image_dir": "i"},
        }
    )
    assert spec.max_new_tokens == 10


# ---------------------------------------------------------------------------------------------
# Undecodable images
# ---------------------------------------------------------------------------------------------


def test_a_corrupt_image_stops_with_its_path_or_scores_empty(
    model: MM1,
    tok: Tokenizer,
    proc: ImageProcessor,
    tasks: dict[str, Task],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    truncated_jpeg,
) -> None:
    from mm1.eval.fewshot import EvalImageError

    base = tasks["synth_coco"]
    queries = list(base.query[:6])
    bad = truncated_jpeg(tmp_path / "broken.jpg", queries[2].image)
    queries[2] = dataclasses.replace(queries[2], image=bad)
    task = CaptionTask("corrupt", queries, base.support)

    # by default: one line naming the file, not PIL's bare OSError
    with pytest.raises(EvalImageError) as err:
        evaluate(model, tok, proc, EvalConfig(shots=[0], seeds=1), tasks=[task], progress=False)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    assert "truncated" in str(err.value).lower() and "--bad-images empty" in str(err.value)

    # opt-in: the query showing it scores as an empty prediction; the others are generated
    # (perfect captions), and CIDEr's document frequencies still count all six images
    others = [q for i, q in enumerate(queries) if i != 2]
    monkeypatch.setattr(fewshot, "generate", _feed(tok, [" " + q.target for q in others] * 9))
    r = evaluate(
        model,
        tok,
        proc,
        EvalConfig(
            shots=[0, 1], seeds=1, batch_size=4, zero_shot_text_demos=False, bad_images="empty"
        ),
        tasks=[task],
        progress=False,
    )
    assert r["config"]["bad_images"] == "empty"
    assert list(r["bad_images"]) == [str(bad)] and "runcated" in r["bad_images"][str(bad)]
    cell = r["tasks"]["corrupt"]["shots"]["0"]
    assert cell["empty_predictions"] == [1]
    recs = r["predictions"]["corrupt"]["0"]["0"]
    assert recs[2]["prediction"] == "" and recs[2]["bad_images"] == [str(bad)]
    assert [x["prediction"] for i, x in enumerate(recs) if i != 2] == [
        q.target.replace('"', "") for q in others
    ]
    cands = {q.id: q.target for q in others} | {queries[2].id: ""}
    refs = ptb_tokenize_corpus({q.id: list(q.references) for q in queries})
    tok_cands = {
        k: v[0] for k, v in ptb_tokenize_corpus({k: [v] for k, v in cands.items()}).items()
    }
    assert cell["scores"] == [pytest.approx(100 * cider(refs, tok_cands)[0], abs=1e-9)]
    # with a demonstration, the query whose prompt shows the image is the one scored empty
    one = r["predictions"]["corrupt"]["1"]["0"]
    assert [x["prediction"] == "" for x in one] == [x.get("bad_images") is not None for x in one]


def test_a_corrupt_support_image_with_rices(
    model: MM1,
    tok: Tokenizer,
    proc: ImageProcessor,
    tasks: dict[str, Task],
    tmp_path: Path,
    truncated_jpeg,
) -> None:
    from mm1.eval.fewshot import EvalImageError

    base = tasks["synth_vqa"]
    support = list(base.support)
    bad = truncated_jpeg(tmp_path / "broken.jpg", support[0].image)
    support[0] = dataclasses.replace(support[0], image=bad)
    task = VQATask("corrupt_support", base.query[:4], support)
    with pytest.raises(EvalImageError, match="broken.jpg"):
        evaluate(
            model,
            tok,
            proc,
            EvalConfig(shots=[2], seeds=1, demo_selection="rices"),
            tasks=[task],
            progress=False,
        )
    r = evaluate(
        model,
        tok,
        proc,
        EvalConfig(shots=[2], seeds=1, demo_selection="rices", bad_images="empty"),
        tasks=[task],
        progress=False,
    )
    assert list(r["bad_images"]) == [str(bad)]
    recs = r["predictions"]["corrupt_support"]["2"]["0"]
    for x in recs:  # empty exactly where the corrupt demonstration was chosen
        assert ("bad_images" in x) == (support[0].id in x["demos"])
        assert x["prediction"] == "" or "bad_images" not in x


def test_a_model_trained_with_image_boundaries_ends_its_answer_at_img(
    model: MM1,
    tok: Tokenizer,
    proc: ImageProcessor,
    tasks: dict[str, Task],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Trained with <img> before every image, a model ends a caption that an image follows by
    writing <img>: the prediction stops there (before, what it wrote after <img> was scored:
    0-shot CIDEr 50 against 124 for a demo-size model trained with boundaries)."""
    task = tasks["synth_coco"]
    queries = task.query[:4]
    answers = iter([" " + q.target for q in queries])

    def fake_generate(model, prompts, pixel_values=None, **kwargs):
        assert tok.boi_id in kwargs["eos_token_id"]
        return [[*tok.encode(next(answers)), tok.boi_id, *tok.encode(" junk")] for _ in prompts]

    monkeypatch.setattr(fewshot, "generate", fake_generate)
    r = evaluate(
        model,
        tok,
        proc,
        EvalConfig(shots=[0], seeds=1, zero_shot_text_demos=False, max_examples=4, batch_size=4),
        tasks=[task],
        prompt_format=PromptFormat(Q, image_boundaries=True),
        progress=False,
    )
    recs = r["predictions"]["synth_coco"]["0"]["0"]
    assert [x["prediction"] for x in recs] == [q.target.replace('"', "") for q in queries]
