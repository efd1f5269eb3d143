"""Caption options as sd-scripts applies them, checked on the token ids the text encoder receives,
--max_token_length 150 / 225 in 75-token chunks, and resume staying exact with random captions."""
import types

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import train_network
from conftest_tiny import tiny_sd_path  # noqa: F401  (fixture used by name)
from library.captions import CaptionRules, class_tokens
from library.dataset import Augment, FolderDataset
from library.tiny_sd import tiny_tokenizer
from library.trainer.step import _join_chunks, _token_ids

TOKENIZER = tiny_tokenizer()
CAPTION = "sks, red circle, blue square, striped background, small shape"


def ids(text):
    return _token_ids(TOKENIZER, [text], "cpu")[0].tolist()


def processed(rules, caption=CAPTION, epoch=1, seed=0):
    return rules.apply(caption, epoch, torch.Generator().manual_seed(seed))


def test_prefix_and_suffix_are_joined_with_a_space():
    out = processed(CaptionRules(prefix="a photo of", suffix="in the style"))
    assert ids(out) == ids("a photo of " + CAPTION + " in the style")


def test_shuffle_keeps_the_first_keep_tokens_tags_and_permutes_the_rest():
    rules = CaptionRules(shuffle=True, keep_tokens=1)
    outs = {processed(rules, seed=s) for s in range(20)}
    assert len(outs) > 1  # it does shuffle
    for out in outs:
        tags = out.split(", ")
        assert tags[0] == "sks" and sorted(tags[1:]) == sorted(t.strip() for t in CAPTION.split(",")[1:])
        assert ids(out) == ids(", ".join(tags))
    assert processed(rules, seed=3) == processed(rules, seed=3)  # a function of the generator's state


def test_keep_tokens_separator_fixes_the_head_and_the_tail():
    rules = CaptionRules(shuffle=True, keep_tokens_separator="|||")
    for seed in range(10):
        tags = processed(rules, "sks, red ||| circle, square, star ||| striped", seed=seed).split(", ")
        assert tags[:2] == ["sks", "red"] and tags[-1] == "striped" and sorted(tags[2:5]) == ["circle", "square", "star"]


def test_caption_dropout_and_every_n_epochs_give_an_empty_caption():
    assert processed(CaptionRules(dropout_rate=1.0)) == ""
    every = CaptionRules(dropout_every_n_epochs=2)
    assert processed(every, epoch=2) == "" and processed(every, epoch=4) == "" and processed(every, epoch=3) == CAPTION
    assert ids("") == ids(processed(every, epoch=2))  # BOS, EOS and padding only


def test_tag_dropout_drops_only_the_tags_not_kept():
    assert processed(CaptionRules(tag_dropout_rate=1.0, keep_tokens=2)) == "sks, red circle"
    assert processed(CaptionRules(tag_dropout_rate=0.0, keep_tokens=2)) == CAPTION


def test_a_missing_caption_file_falls_back_to_the_folder_class_token(tmp_path):
    folder = tmp_path / "10_sks dog"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "1.png")
    Image.new("RGB", (64, 64)).save(folder / "2.png")
    (folder / "2.txt").write_text("a dog on a sofa")
    ds = FolderDataset(str(tmp_path), 64, ".txt")
    assert sorted({it.caption for it in ds.items}) == ["a dog on a sofa", "sks dog"]
    assert ds.folders["10_sks dog"]["missing_captions"] == 1
    assert class_tokens("10_sks dog") == "sks dog"


@pytest.mark.parametrize("length,chunks", [(150, 2), (225, 3)])
def test_max_token_length_keeps_every_token_in_75_token_chunks(length, chunks):
    long_caption = " ".join(["red", "circle", "blue"] * 90)  # 270 tokens, single-token words
    full = TOKENIZER([long_caption], padding="max_length", max_length=length + 2, truncation=True).input_ids[0]
    got = _token_ids(TOKENIZER, [long_caption], "cpu", length)
    assert got.shape == (chunks, 77)
    assert torch.cat([c[1:76] for c in got]).tolist() == full[1:length + 1]  # all of them, in order
    assert got[:, 0].tolist() == [TOKENIZER.bos_token_id] * chunks
    assert len(ids(long_caption)) == 77  # without the option: cut at 75, as sd-scripts
    hidden = torch.arange(chunks * 77, dtype=torch.float32).reshape(chunks, 77, 1)
    joined = _join_chunks(hidden, 1, length)
    assert joined.shape == (1, length + 2, 1)
    kept = [int(v) for v in joined[0, :, 0]]
    assert kept[0] == 0 and kept[-1] == chunks * 77 - 1 and kept[1:3] == [1, 2] and kept[76] == 78


def test_random_captions_resume_bit_exact(tiny_sd_path, tmp_path):
    from library.dataset_gen import make_dataset

    data = make_dataset(str(tmp_path / "data"), n_images=6, resolution=64, seed=0)
    common = ["--pretrained_model_name_or_path", tiny_sd_path, "--train_data_dir", data, "--caption_extension", ".txt",
              "--max_train_steps", "6", "--train_batch_size", "2", "--seed", "3", "--no_progress", "--network_dim", "4",
              "--optimizer_type", "AdamW", "--learning_rate", "1e-3", "--shuffle_caption", "--keep_tokens", "1",
              "--caption_tag_dropout_rate", "0.3", "--caption_dropout_rate", "0.2", "--max_token_length", "150"]

    def run(out, *extra):
        assert train_network.main([*common, "--output_dir", str(tmp_path / out), "--output_name", out, *extra]) == 0
        with safe_open(str(tmp_path / out / f"{out}.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    straight = run("a")
    run("b", "--save_every_n_steps", "2", "--save_state")
    resumed = run("c", "--resume", str(tmp_path / "b" / "b-step00000004-state"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_the_dataset_applies_the_rules_only_when_augmenting(tmp_path):
    folder = tmp_path / "1_x"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "1.png")
    (folder / "1.txt").write_text(CAPTION)
    args = types.SimpleNamespace(caption_prefix="p", caption_suffix=None, shuffle_caption=False, keep_tokens=0,
                                 keep_tokens_separator=None, caption_dropout_rate=0.0,
                                 caption_dropout_every_n_epochs=0, caption_tag_dropout_rate=0.0)
    ds = FolderDataset(str(tmp_path), 64, ".txt", captions=CaptionRules.from_args(args))
    assert ds.batch([0])[1] == [CAPTION]  # no augmentation: as written (held-out evaluation)
    assert ds.batch([0], Augment())[1] == ["p " + CAPTION]
