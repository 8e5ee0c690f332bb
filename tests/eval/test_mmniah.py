"""The MM-NIAH harness: MM-NIAH jsonl and synthetic shards read into records, prompts as training lays
them out, and tools/evaluate.py end to end on a tiny untrained model."""

from __future__ import annotations

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
from megatron_v2pe.eval.scoring import TASK_KINDS
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


@pytest.fixture(scope="module")
def mmniah_dir(tmp_path_factory):
    """Four MM-NIAH-format files (one per answer style) with tiny images beside them."""
    root = tmp_path_factory.mktemp("mmniah")
    (root / "images").mkdir()
    names = [f"images/{_png(root / 'images' / f'{k}.png', (40 * k, 100, 200))}" for k in range(6)]
    files = {
        "retrieval-text-val.jsonl": [
            {
                "id": 0,
                "images_list": names[:2],
                "context": "Some text. <image> More text. The secret code is 417. <image> The end.",
                "question": "What is the secret code?",
                "answer": "417",
                "meta": {"placed_depth": [0.5], "context_length": 1200, "num_images": 2},
            },
            {
                "id": 1,
                "images_list": [],
                "context": "Only text here. The secret code is 12.",
                "question": "What is the secret code?",
                "answer": "12",
                "meta": {"placed_depth": [1.0], "context_length": 300, "num_images": 0},
            },
        ],
        "counting-image-val.jsonl": [
            {
                "id": 2,
                "images_list": names[:3],
                "context": "<image> a <image> b <image>",
                "question": "How many stars in each image?",
                "answer": [1, 0, 2],
                "meta": {"placed_depth": [0.7, 0.1, 0.4], "context_length": 800, "num_images": 3},
            }
        ],
        "retrieval-image-val.jsonl": [
            {
                "id": 3,
                "images_list": names[:1],
                "context": "Look: <image> done.",
                "question": "Which image appeared above?",
                "choices_image_list": names[2:6],
                "answer": 2,
                "meta": {"placed_depth": [0.0], "context_length": 500, "num_images": 1},
            }
        ],
        "reasoning-image-val.jsonl": [
            {
                "id": 4,
                "images_list": names[:1],
                "context": "<image> text",
                "question": "Which animal appears more often?",
                "choices": ["cat", "dog", "bird", "fish"],
                "answer": "dog",
                "meta": {"placed_depth": [0.3, 0.9], "context_length": 600, "num_images": 1},
            }
        ],
    }
    for name, items in files.items():
        (root / name).write_text("".join(json.dumps(item) + "\n" for item in items))
    return root


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
    assert mmniah.task_name("retrieval-text-val.jsonl") == "retrieval-text-needle"
    assert mmniah.task_name("data/counting_image.jsonl") == "counting-image-needle"
    assert mmniah.task_name("reasoning-text-needle") == "reasoning-text-needle"
    with pytest.raises(ValueError, match="--task"):
        mmniah.task_name("visual-reasoning.jsonl")


def test_reads_mmniah_jsonl(mmniah_dir):
    records = mmniah.read_records([str(mmniah_dir / "*.jsonl")])
    by_id = {r.id: r for r in records}
    assert sorted(by_id) == ["0", "1", "2", "3", "4"]
    assert by_id["0"].task == "retrieval-text-needle" and by_id["0"].answer == "417"
    assert by_id["0"].depth == 0.5 and by_id["0"].meta_length == 1200 and len(by_id["0"].images) == 2
    assert by_id["1"].images == [] and by_id["1"].depth == 1.0
    assert by_id["2"].task == "counting-image-needle" and by_id["2"].answer == [1, 0, 2]
    assert by_id["2"].depth == 0.1  # the first needle's depth
    # image options follow the context's images; the index answer becomes a letter
    assert by_id["3"].answer == "C" and len(by_id["3"].images) == 5
    assert by_id["3"].prompt.count("<image>") == 5 and "D. <image>" in by_id["3"].prompt
    assert mmniah.CHOICE_INSTRUCTION in by_id["3"].prompt
    assert by_id["4"].answer == "B" and "B. dog" in by_id["4"].prompt
    assert by_id["3"].images[1] == (mmniah_dir / "images" / "2.png").read_bytes()


def test_bad_mmniah_lines_say_where(tmp_path):
    path = tmp_path / "counting-text.jsonl"
    path.write_text(
        json.dumps({"context": "x", "question": "q", "answer": "[1, x]", "meta": {"placed_depth": 0}})
    )
    with pytest.raises(ValueError, match=r"counting-text.jsonl:1: counting answer"):
        list(mmniah.read_mmniah_jsonl(path))
    path.write_text(
        json.dumps({"context": "<image>", "question": "q", "answer": "a", "meta": {"placed_depth": 0}})
    )
    with pytest.raises(ValueError, match="1 <image> placeholders but 0 images"):
        list(mmniah.read_mmniah_jsonl(path))


def test_prompt_is_the_training_layout_cut_before_the_answer(mmniah_dir, tokenizer):
    record = next(r for r in mmniah.read_records([str(mmniah_dir / "*.jsonl")]) if r.id == "3")
    builder = mmniah.prompt_builder(tokenizer, TOKENS_PER_TILE, TILE)
    built = mmniah.build_prompt(builder, record)
    tokens = built.tokens.tolist()
    assert tokenizer.decode(tokens).endswith("<|im_start|>assistant\n")
    assert built.tiles.shape == (5, TILE, TILE, 3)  # one tile per image, thumbnails not needed
    assert tokens.count(tokenizer.img_context_id) == 5 * TOKENS_PER_TILE
    assert tokens.count(tokenizer.img_start_id) == tokens.count(tokenizer.img_end_id) == 5
    assert built.answer_tokens.tolist() == tokenizer.encode("C") + [tokenizer.token_id(IM_END)]


def test_reads_synthetic_shards(synth_dir):
    directory, samples = synth_dir
    stats = mmniah.ShardReadStats()
    records = mmniah.read_records([str(directory)], stats=stats)
    assert stats.read == 12 and stats.skipped == {"longvqa": 2}
    assert {r.task for r in records} == set(TASK_KINDS)
    expected = {s.key: s for s in samples if s.metadata["family"] == "mmniah"}
    for record in records:
        sample = expected[record.id]
        assert record.depth == min(sample.metadata["depths"])
        assert record.meta_length == sample.metadata["context_tokens"]
        assert record.prompt == sample.conversations[0]["value"]
        assert len(record.images) == len(sample.images)
        assert record.answer_text.replace(" ", "") == sample.metadata["answer"].replace(" ", "")
        if TASK_KINDS[record.task] == "counting":
            assert isinstance(record.answer, list)


def test_report_bins_and_fills_gaps_with_none():
    results = [
        mmniah.SampleResult("a", "retrieval-text-needle", 100, 100, 0.0, "1", "1", 1.0),
        mmniah.SampleResult("b", "retrieval-text-needle", 100, 100, 0.9, "1", "2", 0.0),
        mmniah.SampleResult("c", "retrieval-text-needle", 300, 300, 0.5, "1", "1", 1.0),
        mmniah.SampleResult("d", "counting-text-needle", 250, 250, 0.5, [1, 2], "[1, 3]", 0.5),
    ]
    assert mmniah.default_length_edges([100, 250, 300]) == [64, 128, 256]
    summary = mmniah.report_dict(results, [64, 128, 256])
    assert summary["length_bins"] == ["64-128", "128-256", ">=256"]
    assert summary["cells"]["retrieval-text-needle"][0] == [1.0, None, None, None, 0.0]
    assert summary["per_length"]["retrieval-text-needle"] == [0.5, None, 1.0]
    assert summary["per_length"]["counting-text-needle"] == [None, 0.5, None]
    assert summary["mean_per_length"] == [0.5, 0.5, 1.0]
    assert summary["counts"]["retrieval-text-needle"][0] == [1, 0, 0, 0, 1]
    assert summary["overall"] == pytest.approx((0.75 + 0.5) / 2)


@pytest.mark.usefixtures("megatron_runtime")
def test_evaluate_end_to_end(tmp_path, tokenizer, tokenizer_dir, mmniah_dir, synth_dir):
    from megatron_v2pe.convert.checkpoint import TOKENIZER_DIR, save_megatron
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
    save_megatron(model, config, checkpoint)
    shutil.copytree(tokenizer_dir, checkpoint / TOKENIZER_DIR)

    evaluate = load_tool("evaluate")
    out = tmp_path / "out"
    code = evaluate.main(
        [
            "--checkpoint", str(checkpoint),
            "--data", str(synth_dir[0]), str(mmniah_dir / "*.jsonl"),
            "--max-new-tokens", "3",
            "--batch-size", "6",
            "--attention-backend", "reference",
            "--delta-policy", "auto",  # the form --help shows: auto over the trained window
            "--trained-window", "2048",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["delta_policy"] == "auto:2048" and summary["skipped"] == {"longvqa": 2}
    assert len(summary["samples"]) == 17
    assert set(summary["tasks"]) == set(TASK_KINDS)
    n_len = len(summary["length_bins"])
    assert n_len == len(summary["length_edges"]) >= 2
    for task in summary["tasks"]:
        assert len(summary["cells"][task]) == n_len
        assert all(len(row) == len(summary["depth_bins"]) == 5 for row in summary["cells"][task])
        assert len(summary["per_length"][task]) == n_len
        assert 0.0 <= summary["per_task"][task] <= 1.0
    assert sum(np.sum(summary["counts"][t]) for t in summary["tasks"]) == 17
    for sample in summary["samples"]:
        assert sample["context_length"] == sample["prompt_tokens"] > 0
        assert (
            isinstance(sample["response"], str)
            and sample["score"] in (0.0, 1.0)
            or (TASK_KINDS[sample["task"]] == "counting" and 0.0 <= sample["score"] <= 1.0)
        )
    for name in ("heatmap.png", "accuracy_vs_length.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 200

    # teacher-forced scoring by metadata lengths, with explicit bins
    out2 = tmp_path / "out2"
    teacher_forced = [
        "--checkpoint", str(checkpoint),
        "--data", str(mmniah_dir / "*.jsonl"),
        "--teacher-forced",
        "--length-from", "meta",
        "--length-bins", "256", "1024",
        "--delta-policy", "fixed:0.5",
        "--attention-backend", "reference",
    ]  # fmt: skip
    code = evaluate.main([*teacher_forced, "--out", str(out2)])
    assert code == 0
    summary = json.loads((out2 / "results.json").read_text())
    assert summary["mode"] == "teacher-forced" and summary["delta_policy"] == "fixed:0.5"
    assert summary["length_bins"] == ["256-1024", ">=1024"]
    assert summary["counts"]["retrieval-text-needle"] == [[0, 0, 0, 0, 1], [0, 0, 1, 0, 0]]

    # the same scoring with every sequence split over two context-parallel ranks
    out3 = tmp_path / "out3"
    arguments = [*teacher_forced, "--context-parallel-size", "2", "--out", str(out3)]
    assert evaluate.main(arguments) == 2  # two ranks asked for, one process here
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}"]
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
