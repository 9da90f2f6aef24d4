"""The lmms-eval backend: `python -m lmms_eval --model mm1` on a local task, and MM1LMM itself.

lmms-eval is an optional extra (see mm1.eval.lmms_eval); these tests skip only when it is not
importable. The environment checks (CPU torch, no torchvision) always run: a plain
`pip install lmms-eval` would bring a CUDA torch and torchvision, which break this environment.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mm1.config import ConnectorConfig, DecoderConfig, ModelConfig, VisionConfig
from mm1.data.images import ImageProcessor
from mm1.data.tokenizer import Tokenizer
from mm1.eval.prompts import encode_prompt
from mm1.models.generation import generate
from mm1.models.mllm import MM1
from mm1.pretrained import load_pretrained, save_pretrained

HAS_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None
needs_lmms_eval = pytest.mark.skipif(
    not HAS_LMMS_EVAL,
    reason="lmms_eval is not importable (optional extra; see the install steps in mm1.eval.lmms_eval)",
)


def test_torch_is_the_cpu_build_and_torchvision_is_absent() -> None:
    assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"
    assert importlib.util.find_spec("torchvision") is None, "torchvision must not be installed"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, world_copy) -> Path:
    """The tiny synthetic world (a copy of the session's)."""
    root = world_copy(tmp_path_factory.mktemp("world"))
    return root


@pytest.fixture(scope="module")
def exported(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = Tokenizer.from_file(world / "tokenizer.json")
    cfg = ModelConfig(
        vision=VisionConfig(
            image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, act="gelu"
        ),
        connector=ConnectorConfig(type="avgpool", num_tokens=4),
        decoder=DecoderConfig(
            vocab_size=tok.vocab_size, dim=32, layers=2, heads=4, kv_heads=2, ffn_dim=64
        ),
        image_token_id=tok.image_id,
        init_std=0.2,  # peakier logits than the default, so outputs vary with the image
    )
    torch.manual_seed(0)
    return save_pretrained(
        MM1(cfg), tok, ImageProcessor.clip(32), tmp_path_factory.mktemp("export")
    )


def _local_docs(world: Path, n: int = 4) -> list[dict]:
    qs = json.loads((world / "eval/val/vqa_questions.json").read_text())["questions"][:n]
    anns = {
        a["question_id"]: a
        for a in json.loads((world / "eval/val/vqa_annotations.json").read_text())["annotations"]
    }
    docs = []
    for q in qs:
        image = world / f"eval/val/images/world_val_{q['image_id']:012d}.jpg"
        answers = [a["answer"] for a in anns[q["question_id"]]["answers"]]
        docs.append(
            {
                "question_id": q["question_id"],
                "image_path": str(image),
                "question": q["question"],
                "answers": answers,
                "choices": ["red", "blue", "two"],
                "label": 0,
            }
        )
    return docs


TASK_UTILS = """
from PIL import Image

from mm1.eval.metrics import vqa_accuracy


def doc_to_visual(doc):
    return [Image.open(doc["image_path"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return "Question:" + doc["question"] + " Short answer:"


def process_results(doc, results):
    return {"vqa_accuracy": vqa_accuracy(results[0].strip().lower(), doc["answers"])}
"""


def _write_tasks(root: Path, data: Path) -> None:
    """Two local lmms-eval tasks over a JSON-lines file: generation (VQA) and multiple choice
    (which goes through loglikelihood). `dataset_path: json` + `data_files` loads local data."""
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
metadata:
  version: 0.0
"""
    (root / "utils.py").write_text(TASK_UTILS)
    (root / "mm1_local_vqa.yaml").write_text(
        "task: mm1_local_vqa\noutput_type: generate_until\n"
        + common
        + """doc_to_target: label
generation_kwargs:
  until: ["\\n"]
  max_new_tokens: 5
process_results: !function utils.process_results
metric_list:
  - metric: vqa_accuracy
    aggregation: mean
    higher_is_better: true
"""
    )
    (root / "mm1_local_mc.yaml").write_text(
        "task: mm1_local_mc\noutput_type: multiple_choice\n"
        + common
        + """doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
    )


@needs_lmms_eval
def test_lmms_eval_cli_runs_mm1_on_a_local_task(
    world: Path, exported: Path, tmp_path: Path
) -> None:
    docs = _local_docs(world)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks, data)
    # Register the backend exactly as the installed package does, through the entry point
    # group lmms_eval.models, here from a dist-info on PYTHONPATH.
    site = tmp_path / "site"
    info = site / "mm1_lmms_test-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mm1-lmms-test\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(
        "[lmms_eval.models]\nmm1 = mm1.eval.lmms_eval:manifest\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
    }
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "mm1",
        "--model_args",
        f"pretrained={exported}",
        "--tasks",
        "mm1_local_vqa,mm1_local_mc",
        "--include_path",
        str(tasks),
        "--batch_size",
        "3",
        "--device",
        "cpu",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    assert len(found) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # lmms-eval exits 0 on errors
    (results_file,) = found
    results = json.loads(Path(results_file).read_text())["results"]
    assert 0.0 <= results["mm1_local_vqa"]["vqa_accuracy,none"] <= 1.0
    assert 0.0 <= results["mm1_local_mc"]["acc,none"] <= 1.0
    # multiple choice went through loglikelihood: one (loss, greedy) per choice, smallest wins
    (mc_file,) = glob.glob(str(out / "**" / "*samples_mm1_local_mc.jsonl"), recursive=True)
    for line in Path(mc_file).read_text().splitlines():
        sample = json.loads(line)
        losses = [float(r[0]) for r in sample["filtered_resps"]]
        assert len(losses) == 3 and all(x > 0 for x in losses)
        assert sample["acc"] == float(losses.index(min(losses)) == 0)
    # the answers lmms-eval logged are what the model generates for that prompt
    (samples_file,) = glob.glob(str(out / "**" / "*samples_mm1_local_vqa.jsonl"), recursive=True)
    samples = sorted(
        (json.loads(line) for line in Path(samples_file).read_text().splitlines()),
        key=lambda s: s["doc_id"],
    )
    loaded = load_pretrained(exported)
    tok, model = loaded.tokenizer, loaded.model
    for doc, sample in zip(docs, samples):
        ids = encode_prompt(
            tok, "<image>Question:" + doc["question"] + " Short answer:", loaded.prompt_format
        )
        from PIL import Image

        with Image.open(doc["image_path"]) as im:
            pixels = loaded.processor([im.convert("RGB")])
        (new,) = generate(
            model,
            [ids],
            pixels,
            max_new_tokens=5,
            eos_token_id=[tok.eos_id, tok.endofchunk_id],
            stop_strings=["\n"],
            tokenizer=tok,
        )
        end = next((i for i, t in enumerate(new) if t in (tok.eos_id, tok.endofchunk_id)), len(new))
        expected = tok.decode(new[:end]).split("\n", 1)[0]
        resp = sample["filtered_resps"]
        resp = resp[0] if isinstance(resp, list) else resp
        assert resp.strip() == expected.strip()


# ---------------------------------------------------------------------------------------------
# MM1LMM in process
# ---------------------------------------------------------------------------------------------


def _request(args: tuple) -> SimpleNamespace:
    return SimpleNamespace(args=args, arguments=args)


@pytest.fixture(scope="module")
def lmm(exported: Path):
    if not HAS_LMMS_EVAL:
        pytest.skip("lmms_eval is not importable")
    from mm1.eval.lmms_eval import MM1LMM

    return MM1LMM.create_from_arg_string(
        f"pretrained={exported},max_new_tokens=6", {"batch_size": 2, "device": "cpu"}
    )


@needs_lmms_eval
def test_manifest() -> None:
    from mm1.eval.lmms_eval import manifest

    m = manifest()
    assert m.model_id == "mm1" and m.simple_class_path == "mm1.eval.lmms_eval.MM1LMM"


@needs_lmms_eval
def test_generate_until_is_batched_generate(lmm, world: Path) -> None:
    docs = _local_docs(world, 3)
    lmm.task_dict = {"t": {"test": docs}}

    def visual(doc):
        from PIL import Image

        return [Image.open(doc["image_path"]).convert("RGB")]

    reqs = [
        _request(
            (
                "Question:" + d["question"] + " Short answer:",
                {"until": ["\n"], "max_new_tokens": 4},
                visual,
                i,
                "t",
                "test",
            )
        )
        for i, d in enumerate(docs)
    ]
    reqs.append(_request(("<image>Output:", {"max_new_tokens": 3}, visual, 0, "t", "test")))
    got = lmm.generate_until(reqs)
    tok, model = lmm.tokenizer, lmm.model
    for req, text in zip(reqs, got):
        context, kwargs = req.args[0], req.args[1]
        ids, pixels = lmm.prompt(context, visual(docs[req.args[3]]))
        assert ids.count(tok.image_id) == model.num_image_tokens and ids[0] == tok.bos_id
        (new,) = generate(
            model,
            [ids],
            pixels,
            max_new_tokens=kwargs["max_new_tokens"],
            eos_token_id=[tok.eos_id, tok.endofchunk_id],
            stop_strings=kwargs.get("until", []),
            tokenizer=tok,
        )
        end = next((i for i, t in enumerate(new) if t in (tok.eos_id, tok.endofchunk_id)), len(new))
        assert text == tok.decode(new[:end]).split("\n", 1)[0]
    with pytest.raises(ValueError, match="2 <image> tags but 1 images"):
        lmm.prompt("<image><image>x", visual(docs[0]))
    with pytest.raises(TypeError, match="images only"):
        lmm.prompt("x", ["/some/video.mp4"])


@needs_lmms_eval
def test_compiled_generate_until_answers_as_eager(lmm, exported: Path, world: Path) -> None:
    from mm1.eval.lmms_eval import MM1LMM

    docs = _local_docs(world, 3)

    def visual(doc):
        from PIL import Image

        return [Image.open(doc["image_path"]).convert("RGB")]

    kwargs = {"until": ["\n"], "max_new_tokens": 5}
    reqs = [
        _request(("Question:" + d["question"] + " Short answer:", kwargs, visual, i, "t", "test"))
        for i, d in enumerate(docs)
    ]
    args = f"pretrained={exported},max_new_tokens=6,compile=true"
    compiled = MM1LMM.create_from_arg_string(args, {"batch_size": 2, "device": "cpu"})
    for m in (lmm, compiled):
        m.task_dict = {"t": {"test": docs}}
    eager = lmm.generate_until(reqs)
    assert len(set(eager)) == 3, "answers that hardly differ would hide a mix-up"
    assert compiled.generate_until(reqs) == eager
    with pytest.raises(ValueError, match="compile=true compiles greedy / sampled decoding"):
        MM1LMM(pretrained=str(exported), device="cpu", compile="true", num_beams=3)


@needs_lmms_eval
def test_loglikelihood(lmm, world: Path) -> None:
    docs = _local_docs(world, 2)
    lmm.task_dict = {"t": {"test": docs}}

    def visual(doc):
        from PIL import Image

        return [Image.open(doc["image_path"]).convert("RGB")]

    tok, model = lmm.tokenizer, lmm.model
    reqs = [
        _request(("Question:" + d["question"] + " Short answer: ", "red", visual, i, "t", "test"))
        for i, d in enumerate(docs)
    ]
    got = lmm.loglikelihood(reqs)
    for req, (loss, greedy) in zip(reqs, got):
        doc = docs[req.args[3]]
        # the trailing space moves to the continuation (lm-evaluation-harness convention)
        ctx = encode_prompt(tok, "<image>" + req.args[0].rstrip(" "), lmm.prompt_format)
        whole = encode_prompt(tok, "<image>" + req.args[0] + "red", lmm.prompt_format)
        assert whole[: len(ctx)] == ctx
        cont = whole[len(ctx) :]
        ids = torch.tensor([whole])
        with torch.no_grad():
            logits = model(ids, pixel_values=lmm.prompt("", visual(doc))[1]).logits[0].float()
        lp = logits.log_softmax(-1)
        expected = sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        # lmms-eval's convention: the mean loss per continuation token (multiple choice = argmin)
        assert loss == pytest.approx(-expected / len(cont), abs=1e-5) and loss > 0
        assert greedy == all(
            int(logits[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(cont)
        )
    # the greedy continuation is recognised as greedy
    ids, pixels = lmm.prompt("Question:" + docs[0]["question"], visual(docs[0]))
    (new,) = generate(model, [ids], pixels, max_new_tokens=3)
    text = tok.decode(new)
    if (
        encode_prompt(tok, "<image>Question:" + docs[0]["question"] + text, lmm.prompt_format)[
            len(ids) :
        ]
        == new
    ):
        (res,) = lmm.loglikelihood(
            [_request(("Question:" + docs[0]["question"], text, visual, 0, "t", "test"))]
        )
        assert res[1] is True


@needs_lmms_eval
def test_generate_until_multi_round(lmm, world: Path) -> None:
    docs = _local_docs(world, 1)
    lmm.task_dict = {"t": {"test": docs}}
    seen = []

    def visual(doc):
        from PIL import Image

        return [Image.open(doc["image_path"]).convert("RGB")]

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 2:
            return None, None, True, previous_output, None
        return visual(doc), "Output:", False, previous_output, {"round": round_idx}

    req = _request(("Output:", {"max_new_tokens": 2}, visual, doc_to_text, 0, "t", "test"))
    (rounds,) = lmm.generate_until_multi_round([req])
    assert len(rounds) == 2 and all(isinstance(r, str) for r in rounds)
    assert (
        [s[0] for s in seen] == [1, 2] and seen[1][1] == list(rounds) and seen[1][2] == {"round": 1}
    )


@needs_lmms_eval
def test_prompts_follow_the_saved_prompt_format(exported: Path, tmp_path: Path) -> None:
    # An export trained with image boundaries and vicuna_v1: `chat=true` writes the context as
    # a user turn of that template, and the boundaries follow the saved format by default.
    import shutil

    from PIL import Image

    from mm1.data.prompt_format import PromptFormat
    from mm1.data.tokenizer import tokenize_chat_prompt, tokenize_prompt
    from mm1.eval.lmms_eval import MM1LMM

    model_dir = tmp_path / "export"
    shutil.copytree(exported, model_dir)
    fmt = PromptFormat(4, image_boundaries=True, chat_template="vicuna_v1")
    fmt.save(model_dir)
    image = Image.new("RGB", (32, 32), "red")
    lmm = MM1LMM(pretrained=str(model_dir), device="cpu", chat="true")
    assert lmm.prompt_format == fmt and lmm.image_boundaries
    ids, pixels = lmm.prompt("What colour?", [image])
    user = [{"role": "user", "content": "<image>What colour?"}]
    assert ids == tokenize_chat_prompt(user, [image], lmm.tokenizer, fmt)
    assert lmm.tokenizer.boi_id in ids and "ASSISTANT:" in lmm.tokenizer.decode(ids)
    assert pixels is not None and pixels.shape[0] == 1
    # the continuation is scored after the generation prompt
    _, n, _ = lmm.score_continuation("What colour?", " red", [image])
    assert n == len(lmm.tokenizer.encode(" red"))
    # A template that writes reasoning blocks (as Qwen3's, an empty one for a turn without
    # reasoning): answers are read after the block, and scored after an empty one.
    reasoning = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{{ 'A: <think>\\n\\n</think>\\n\\n' + m['content'] + eos_token }}"
        "{% else %}{{ 'U: ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
    )
    PromptFormat(4, chat_template=reasoning).save(model_dir)
    thinking = MM1LMM(pretrained=str(model_dir), device="cpu", chat="true")
    fed: list[list[int]] = []
    hook = thinking.model.register_forward_pre_hook(lambda _, args: fed.append(args[0][0].tolist()))
    _, n, _ = thinking.score_continuation("What colour?", " red", [image])
    hook.remove()
    block = thinking.tokenizer.encode("<think>\n\n</think>\n\n")
    prompt = tokenize_chat_prompt(user, [image], thinking.tokenizer, thinking.prompt_format)
    assert n == len(thinking.tokenizer.encode(" red"))
    assert fed == [prompt + block + thinking.tokenizer.encode(" red")]
    plain = MM1LMM(pretrained=str(model_dir), device="cpu", image_boundaries="false")
    assert plain.prompt("What colour?", [image])[0] == tokenize_prompt(
        "<image>What colour?", [image], plain.tokenizer, PromptFormat(4, chat_template="vicuna_v1")
    )
