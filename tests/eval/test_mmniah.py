"""The MM-NIAH harness: the released jsonl layout and our synthetic shards read into records, MM-NIAH's
prompts (written out by hand here) laid out as training lays them out, and tools/evaluate.py end to end
on a tiny untrained model."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_v2pe.data.long_context_synth import SynthConfig, write_samples
from megatron_v2pe.data.long_context_synth import generate as synth_generate
from megatron_v2pe.data.tokenizer import IM_END, load_tokenizer, train_sentencepiece
from megatron_v2pe.eval import mmniah
from megatron_v2pe.eval.scoring import TASK_KINDS, score_response
from tests.data.helpers import load_tool
from tests.parallel.launch import REPO_ROOT, free_port

TILE = 56  # the tiny preset's tile: 4 <IMG_CONTEXT> per tile
TOKENS_PER_TILE = 4


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    texts = [
        f"The secret code of the otter is {i}. How many needles? [1, 2, 3] Answer with the letter A B C D."
        for i in range(100)
    ]
    directory = tmp_path_factory.mktemp("tokenizer")
    train_sentencepiece(texts, directory / "tokenizer.model", vocab_size=300)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def _png(path, color, size=(TILE, TILE)):
    Image.new("RGB", size, color).save(path)
    return path.name


def _meta(depth, length, needles, choices=None, choice_images=None):
    """An MM-NIAH ``meta`` as the released files have it."""
    return {
        "placed_depth": depth,
        "context_length": length,
        "context_length_text": length - 100,
        "context_length_image": 100,
        "num_images": 0,
        "needles": needles,
        "choices": choices,
        "choices_image_path": choice_images,
    }


@pytest.fixture(scope="module")
def mmniah_dir(tmp_path_factory):
    """One MM-NIAH file per task in the released layout (options under ``meta``), tiny images beside."""
    root = tmp_path_factory.mktemp("mmniah")
    (root / "images").mkdir()
    names = [f"images/{_png(root / 'images' / f'{k}.png', (40 * k, 100, 200))}" for k in range(6)]
    names[1] = f"images/{_png(root / 'images' / 'wide.png', (0, 0, 0), (2 * TILE, TILE))}"
    files = {
        "retrieval-text": [
            {
                "id": 0,
                "images_list": names[:2],
                "context": "Some text. <image> More text. The secret code is 417. <image> The end.",
                "question": "What is the secret code?",
                "answer": "417",
                "meta": _meta(0.5, 1200, ["The secret code is 417."]),
            },
            {
                "id": 1,
                "images_list": [],
                "context": "Only text here. The secret code is 12.",
                "question": "What is the secret code?",
                "answer": "12",
                "meta": _meta([1.0], 300, ["The secret code is 12."]),  # under 1,000 tokens
            },
        ],
        "retrieval-image": [
            {
                "id": 0,
                "images_list": names[:1],
                "context": "Look: <image> done.",
                "question": "Which of the following images appears in the document?",
                "answer": 2,
                "meta": _meta([0.0], 1500, [names[4]], choice_images=names[2:6]),
            }
        ],
        "counting-text": [
            {
                "id": 0,
                "images_list": [],
                "context": "Apples are red. Pears are green. Apples again.",
                "question": "How many times is each fruit mentioned?",
                "answer": [2, 0, 1],
                "meta": _meta([0.2, 0.5, 0.9], 2500, ["Apples are red.", "Pears are green.", "Apples again"]),
            }
        ],
        "counting-image": [
            {
                "id": 0,
                "images_list": names[:3],
                "context": "<image> a <image> b <image>",
                "question": "How many stars are in each image?",
                "answer": "[1, 0]",
                "meta": _meta([0.7, 0.1], 5000, [names[0], names[2]]),
            }
        ],
        "reasoning-text": [
            {
                "id": 0,
                "images_list": [],
                "context": "Alice is taller than Bob. Bob is taller than Carol.",
                "question": "Who is the tallest?",
                "answer": "Alice",
                "meta": _meta([0.3, 0.6], 1100, ["Alice is taller than Bob.", "Bob is taller than Carol."]),
            }
        ],
        "reasoning-image": [
            {
                "id": 0,
                "images_list": names[:2],
                "context": "<image> text",
                "question": "Which animal appears in <image> more often?",
                "answer": 1,
                "choices": ["decoy"],  # not where the released files keep options: ignored
                "meta": _meta(0.4, 1800, [names[3]], choices=["cat", "dog", "bird", "fish"]),
            }
        ],
    }
    for task, items in files.items():
        (root / f"{task}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    return root


SINGLE_WORD = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
# MM-NIAH's prompt of each task's first record (utils/tools.py get_input + eval_internvl.py), by hand
OFFICIAL_PROMPTS = {
    "retrieval-text": "Some text. <image> More text. The secret code is 417. <image> The end.\n"
    f"What is the secret code?\n{SINGLE_WORD}",
    "retrieval-image": "Look: <image> done.\nWhich of the following images appears in the document?\n"
    f"A. <image>\nB. <image>\nC. <image>\nD. <image>\n{LETTER}",
    "counting-text": "Apples are red. Pears are green. Apples again.\n"
    f"How many times is each fruit mentioned?\n{SINGLE_WORD}",
    "counting-image": f"<image> a <image> b <image>\nHow many stars are in each image?\n{SINGLE_WORD}",
    "reasoning-text": "Alice is taller than Bob. Bob is taller than Carol.\n"
    f"Who is the tallest?\n{SINGLE_WORD}",
    "reasoning-image": "<image> text\nWhich animal appears in <image> more often?\n"
    f"A. cat\nB. dog\nC. bird\nD. fish\n{LETTER}",
}
# V2PE's copy (eval/mm_niah/tools.py + eval_mm_niah.py): no newline after the context, and no "single
# word" line when the answer is a list (counting-text here; counting-image's answer is JSON text)
V2PE_PROMPTS = {
    "retrieval-text": "Some text. <image> More text. The secret code is 417. <image> The end."
    f"What is the secret code?\n{SINGLE_WORD}",
    "retrieval-image": "Look: <image> done.Which of the following images appears in the document?\n"
    f"A. <image>\nB. <image>\nC. <image>\nD. <image>\n{LETTER}",
    "counting-text": "Apples are red. Pears are green. Apples again.How many times is each fruit mentioned?",
    "counting-image": f"<image> a <image> b <image>How many stars are in each image?\n{SINGLE_WORD}",
    "reasoning-text": "Alice is taller than Bob. Bob is taller than Carol."
    f"Who is the tallest?\n{SINGLE_WORD}",
    "reasoning-image": "<image> textWhich animal appears in <image> more often?\n"
    f"A. cat\nB. dog\nC. bird\nD. fish\n{LETTER}",
}


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    """Twelve synthetic MM-NIAH samples (each task twice) plus two Long-VQA ones, in shards."""
    config = SynthConfig(image_size=TILE, tokens_per_image=TOKENS_PER_TILE, words_per_paragraph=12)
    directory = tmp_path_factory.mktemp("synth")
    samples = [
        *synth_generate("mmniah", 12, 0, config, context_tokens=(60, 120), depths=(0.0, 0.5, 1.0)),
        *synth_generate("longvqa", 2, 0, config, context_tokens=(40,)),
    ]
    write_samples(samples, directory, max_bytes=20000)
    return directory, samples


def test_task_names():
    assert mmniah.task_name("retrieval-text-val.jsonl") == "retrieval-text"
    assert mmniah.task_name("data/counting_image.jsonl") == "counting-image"
    assert mmniah.task_name("reasoning-text-needle") == "reasoning-text"
    with pytest.raises(ValueError, match="--task"):
        mmniah.task_name("visual-reasoning.jsonl")


def _first_records(directory, protocol="mmniah"):
    records = mmniah.read_records([str(directory / "*.jsonl")], protocol=protocol)
    return {task: next(r for r in records if r.task == task) for task in TASK_KINDS}, records


def test_reads_the_released_layout(mmniah_dir):
    first, records = _first_records(mmniah_dir)
    assert len(records) == 7
    assert {task: r.prompt for task, r in first.items()} == OFFICIAL_PROMPTS
    text = first["retrieval-text"]
    assert text.answer == "417" and text.depths == (0.5,) and text.meta_length == 1200
    assert text.needles == ("The secret code is 417.",) and len(text.images) == 2
    assert text.tiles_per_image == 1  # MM-NIAH resizes every image to one tile
    # image options come from meta.choices_image_path, after the context's images; the answer is 0-based
    image = first["retrieval-image"]
    assert image.answer == 2 and image.answer_text == "C" and len(image.images) == 5
    assert image.images[1] == (mmniah_dir / "images" / "2.png").read_bytes()
    assert image.images[4] == (mmniah_dir / "images" / "5.png").read_bytes()
    assert first["counting-text"].answer == [2, 0, 1] and first["counting-text"].depths == (0.2, 0.5, 0.9)
    assert first["counting-image"].answer == [1, 0] and first["counting-image"].answer_text == "[1, 0]"
    assert first["reasoning-text"].answer == "Alice" and first["reasoning-text"].depths == (0.3, 0.6)
    # text options from meta.choices (a top-level "choices" is not the released layout and is ignored)
    reasoning = first["reasoning-image"]
    assert reasoning.answer == 1 and reasoning.answer_text == "B" and "decoy" not in reasoning.prompt
    assert reasoning.images[1] == (mmniah_dir / "images" / "wide.png").read_bytes()  # the question's image
    v2pe, _ = _first_records(mmniah_dir, "v2pe")
    assert {task: r.prompt for task, r in v2pe.items()} == V2PE_PROMPTS


def test_bad_mmniah_lines_say_where(tmp_path):
    path = tmp_path / "counting-text.jsonl"
    line = {"context": "x", "question": "q", "answer": "[1, x]", "meta": {"placed_depth": 0}}
    path.write_text(json.dumps(line))
    with pytest.raises(ValueError, match=r"counting-text.jsonl:1: counting answer"):
        list(mmniah.read_records([path]))
    line.update(context="<image>", answer=[1])
    path.write_text(json.dumps(line))
    with pytest.raises(ValueError, match="1 <image> placeholders but 0 images_list entries and 0 image opt"):
        list(mmniah.read_records([path]))
    path = tmp_path / "retrieval-image.jsonl"
    line = {"context": "x", "question": "q", "answer": 4, "meta": {"placed_depth": 0, "choices": ["a", "b"]}}
    path.write_text(json.dumps(line))
    with pytest.raises(ValueError, match="answer 4 names none of the 2 options"):
        list(mmniah.read_records([path]))
    path.write_text(json.dumps({"context": "x", "question": "q", "answer": 0, "meta": {}}))
    with pytest.raises(ValueError, match="not an MM-NIAH record"):
        list(mmniah.read_records([path]))


def test_unbinnable_lengths_are_refused_before_any_work(mmniah_dir):
    _, records = _first_records(mmniah_dir)
    mmniah.check_lengths(records, "meta")  # one record under 1,000 tokens: dropped, as MM-NIAH does
    with pytest.raises(ValueError, match="7 of 7 records .* shorter than the first length bin, 100000"):
        mmniah.check_lengths(records, "meta", "official", [100000])
    with pytest.raises(ValueError, match="1 of 7 records .*retrieval-text.jsonl:2"):
        mmniah.check_lengths(records, "meta", "adaptive", [1000])
    unrecorded = [dataclasses.replace(records[0], meta_length=None)]
    with pytest.raises(ValueError, match="records no context length; .*--length-from tokens"):
        mmniah.check_lengths(unrecorded, "meta")
    mmniah.check_lengths(unrecorded, "tokens")


def test_prompt_is_the_training_layout_cut_before_the_answer(mmniah_dir, tokenizer):
    first, _ = _first_records(mmniah_dir)
    builder = mmniah.prompt_builder(tokenizer, TOKENS_PER_TILE, TILE, max_tiles=1, template="internlm2-chat")
    built = mmniah.build_prompt(builder, first["retrieval-image"])
    tokens = built.tokens.tolist()
    assert tokenizer.decode(tokens).endswith("<|im_start|>assistant\n")
    assert built.tiles.shape == (5, TILE, TILE, 3)
    assert tokens.count(tokenizer.img_context_id) == 5 * TOKENS_PER_TILE
    assert tokens.count(tokenizer.img_start_id) == tokens.count(tokenizer.img_end_id) == 5
    assert built.answer_tokens.tolist() == tokenizer.encode("C") + [tokenizer.token_id(IM_END)]


def test_prompt_is_in_the_models_chat_template(mmniah_dir, tokenizer):
    """InternVL2.5/3 (``internvl2_5``) put a newline after every <|im_end|>; InternVL2's template does not."""
    first, _ = _first_records(mmniah_dir)
    texts = {}
    for template in ("internlm2-chat", "internvl2_5"):
        builder = mmniah.prompt_builder(tokenizer, TOKENS_PER_TILE, TILE, max_tiles=1, template=template)
        texts[template] = tokenizer.decode(mmniah.build_prompt(builder, first["retrieval-image"]).tokens)
    assert f"{IM_END}<|im_start|>user" in texts["internlm2-chat"]
    assert f"{IM_END}\n<|im_start|>user" in texts["internvl2_5"]
    assert f"{IM_END}\n" not in texts["internlm2-chat"]



def test_images_are_tiled_as_the_protocol_says(mmniah_dir, tokenizer):
    """MM-NIAH resizes each image to one tile; V2PE's copy cuts the wide one into 2 tiles + a thumbnail."""
    tiles = {}
    for protocol in mmniah.PROTOCOLS:
        records = mmniah.read_records([mmniah_dir / "retrieval-text.jsonl"], protocol=protocol)
        budget = mmniah.tile_budget(records[0], max_tiles=6)
        builder = mmniah.prompt_builder(tokenizer, TOKENS_PER_TILE, TILE, budget, template="internlm2-chat")
        built = mmniah.build_prompt(builder, records[0])
        tiles[protocol] = (budget, built.tiles.shape[0])
    assert tiles == {"mmniah": (2, 1 + 1), "v2pe": (10, 1 + 3)}


def test_reads_synthetic_shards(synth_dir):
    directory, samples = synth_dir
    stats = mmniah.ShardReadStats()
    records = mmniah.read_records([str(directory)], stats=stats)
    assert stats.read == 12 and stats.skipped == {"longvqa": 2}
    assert {r.task for r in records} == set(TASK_KINDS)
    expected = {s.key: s for s in samples if s.metadata["family"] == "mmniah"}
    for record in records:
        sample = expected[record.id]
        assert record.depths == tuple(sample.metadata["depths"]) and record.tiles_per_image is None
        assert record.meta_length == sample.metadata["context_tokens"]
        assert record.prompt == sample.conversations[0]["value"]
        assert len(record.images) == len(sample.images)
        assert record.answer_text.replace(" ", "") == sample.metadata["answer"].replace(" ", "")


def test_report_lists_every_bin():
    results = [
        mmniah.SampleResult("a", "retrieval-text", 100, 100, (0.0,), "1", "1", 1.0),
        mmniah.SampleResult("b", "retrieval-text", 100, 100, (0.9,), "1", "2", 0.0),
        mmniah.SampleResult("c", "retrieval-text", 300, 300, (0.5,), "1", "1", 1.0),
        mmniah.SampleResult("d", "counting-text", 250, 250, (0.5, 0.1), [1, 2], "[1, 3]", 0.5),
    ]
    summary = mmniah.report_dict(results, [64, 128, 256], "adaptive")
    assert summary["length_bins"] == ["64-128", "128-256", ">=256"]
    assert summary["depth_bins"] == ["0.0-0.2", "0.2-0.4", "0.4-0.6", "0.6-0.8", "0.8-1.0"]
    assert summary["cells"]["retrieval-text"][0] == [1.0, None, None, None, 0.0]
    assert summary["per_length"]["counting-text"] == [None, 0.5, None]
    assert summary["counts"]["counting-text"][1] == [1, 0, 0, 0, 0]  # the first needle's depth
    assert summary["samples"][3]["depths"] == (0.5, 0.1) and summary["scoring"] == "official"


@pytest.mark.usefixtures("megatron_runtime")
def test_evaluate_end_to_end(tmp_path, capsys, tokenizer, tokenizer_dir, mmniah_dir, synth_dir):
    from megatron_v2pe.checkpoint.model_config import TOKENIZER_DIR
    from megatron_v2pe.checkpoint.model_only import save_model
    from megatron_v2pe.model.presets import language_transformer_config, tiny, vision_transformer_config
    from megatron_v2pe.model.vlm import InternVLModel

    config = tiny(
        vocab_size=-(-tokenizer.vocab_size // 128) * 128, img_context_token_id=tokenizer.img_context_id
    )
    torch.manual_seed(0)
    model = InternVLModel(
        config,
        language_transformer_config(config),
        vision_transformer_config(config),
        attention_backend="reference",
    )
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    save_model(model, config, checkpoint)
    shutil.copytree(tokenizer_dir, checkpoint / TOKENIZER_DIR)

    evaluate = load_tool("evaluate")
    common = ["--checkpoint", str(checkpoint), "--attention-backend", "reference"]

    # the released layout, MM-NIAH's defaults: its prompts, new-token limits, scoring and binning
    out = tmp_path / "out"
    data = ["--data", str(mmniah_dir / "*.jsonl")]
    arguments = [*common, *data, "--print-prompts", "--trained-window", "2048", "--batch-size", "6"]
    # "auto", the form --help shows: auto over the trained window
    assert evaluate.main([*arguments, "--delta-policy", "auto", "--out", str(out)]) == 0
    shown = r"--- prompt of \S+ \((\S+)\)\n(.*?)\n--- end of prompt"
    printed = re.findall(shown, capsys.readouterr().out, re.S)
    assert dict(printed) == OFFICIAL_PROMPTS and len(printed) == 6
    summary = json.loads((out / "results.json").read_text())
    assert summary["delta_policy"] == "auto:2048"
    assert summary["scoring"] == "official" and summary["binning"] == "official"
    official_edges = [1000, 2000, 4000, 8000, 12000, 16000, 24000, 32000, 40000, 48000, 64000]
    assert summary["length_edges"] == official_edges
    assert summary["dropped_below_first_bin"] == 1 and len(summary["samples"]) == 7
    assert summary["tasks"] == list(TASK_KINDS) and set(summary["by_needle"]) == {"image", "text"}
    assert sum(np.sum(summary["counts"][t]) for t in summary["tasks"]) == 6
    for sample in summary["samples"]:
        assert sample["context_length"] != sample["prompt_tokens"]  # the recorded length, not the tokens
        assert sample["score"] == score_response(sample["task"], sample["response"], sample["answer"])
    for name in ("heatmap.png", "accuracy_vs_length.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 200

    # V2PE's protocol, our shards too, binned adaptively by prompt tokens, strict scoring
    out1 = tmp_path / "out1"
    data = ["--data", str(mmniah_dir / "*.jsonl"), str(synth_dir[0]), "--protocol", "v2pe", "--print-prompts"]
    adaptive = ["--binning", "adaptive", "--length-from", "tokens", "--scoring", "strict"]
    assert evaluate.main([*common, *data, *adaptive, "--max-new-tokens", "3", "--out", str(out1)]) == 0
    assert dict(re.findall(shown, capsys.readouterr().out, re.S)) == V2PE_PROMPTS
    summary = json.loads((out1 / "results.json").read_text())
    assert summary["skipped"] == {"longvqa": 2} and len(summary["samples"]) == 19
    assert summary["dropped_below_first_bin"] == 0 and summary["scoring"] == "strict"
    assert summary["protocol"] == "v2pe"
    assert summary["length_edges"][0] <= min(s["prompt_tokens"] for s in summary["samples"])
    assert all(s["context_length"] == s["prompt_tokens"] for s in summary["samples"])

    # teacher-forced scoring by recorded lengths, with explicit bins
    out2 = tmp_path / "out2"
    teacher_forced = [
        *common,
        "--data", str(mmniah_dir / "*.jsonl"),
        "--teacher-forced",
        "--binning", "adaptive",
        "--length-bins", "256", "1024",
        "--delta-policy", "fixed:0.5",
    ]  # fmt: skip
    assert evaluate.main([*teacher_forced, "--out", str(out2)]) == 0
    summary = json.loads((out2 / "results.json").read_text())
    assert summary["mode"] == "teacher-forced" and summary["delta_policy"] == "fixed:0.5"
    assert summary["length_bins"] == ["256-1024", ">=1024"]
    assert summary["counts"]["retrieval-text"] == [[0, 0, 0, 0, 1], [0, 0, 1, 0, 0]]

    # the same scoring with every sequence split over two context-parallel ranks
    out3 = tmp_path / "out3"
    arguments = [*teacher_forced, "--context-parallel-size", "2", "--out", str(out3)]
    assert evaluate.main(arguments) == 2  # two ranks asked for, one process here
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    launch.append(f"--master-port={free_port()}")
    proc = subprocess.run(
        [*launch, str(REPO_ROOT / "tools" / "evaluate.py"), *arguments],
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    under_cp = json.loads((out3 / "results.json").read_text())
    assert under_cp["samples"] == summary["samples"] and under_cp["cells"] == summary["cells"]


@pytest.mark.parametrize("flag", ["--limit", "--trained-window", "--batch-size"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_evaluate_counts_below_one_are_refused(tmp_path, capsys, flag, value):
    evaluate = load_tool("evaluate")
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--checkpoint", str(tmp_path), "--data", "x.jsonl", "--out", "o", flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: must be >= 1, got {value}" in capsys.readouterr().err


@pytest.mark.usefixtures("megatron_runtime")
@pytest.mark.parametrize(
    "change, message",
    [
        ({"--checkpoint": "{tmp}/nowhere"}, "--checkpoint {tmp}/nowhere does not exist; check the path"),
        ({"--data": "{tmp}/retrieval-val.jsonl"}, "--data {tmp}/retrieval-val.jsonl does not exist"),
        ({"--data": "{tmp}/*.jsonl"}, r"--data {tmp}/\*.jsonl matches no file; check the pattern"),
        ({"--out": "{tmp}/taken"}, "--out {tmp}/taken is an existing file; name a directory for the results"),
        ({"--delta-policy": "auto:0"}, "--delta-policy: bad δ policy 'auto:0': auto δ policy needs a"),
        ({"--tokenizer": "{tmp}/taken"}, "{tmp}/taken is not a sentencepiece tokenizer model"),
    ],
)
def test_evaluate_bad_input_is_one_line_before_any_work(tmp_path, capsys, mmniah_dir, change, message):
    evaluate = load_tool("evaluate")
    (tmp_path / "taken").write_text("results of an earlier run\n")
    arguments = {"--checkpoint": str(tmp_path), "--data": str(mmniah_dir / "*.jsonl")}
    arguments["--out"] = str(tmp_path / "o")
    arguments.update({k: v.format(tmp=tmp_path) for k, v in change.items()})
    assert evaluate.main([item for pair in arguments.items() for item in pair]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert re.fullmatch("evaluate.py: error: " + message.format(tmp=tmp_path) + ".*", line)
    assert (tmp_path / "taken").read_text() == "results of an earlier run\n" and not (tmp_path / "o").exists()
