import pytest

from conftest import tiny_config
from finechat.errors import UserError
from finechat.train import train


def test_push_to_hub_offline_fails_after_the_run_folder_is_written(tiny_model_dir, text_file, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(
        tiny_model_dir,
        text_file,
        run_dir,
        max_steps=1,
        batch_size=1,
        max_seq_length=32,
        max_eval_docs=1,
        push_to_hub="someone/finechat-test",
    )
    with pytest.raises(
        UserError, match=r"--push-to-hub someone/finechat-test: upload failed .* is saved, retry when online"
    ):
        train(config)
    assert (run_dir / "adapter_model.safetensors").is_file()
    assert '"status": "complete"' in (run_dir / "finechat.json").read_text()


def test_hub_dataset_offline_is_a_one_line_error():
    from finechat.data import load_corpus

    with pytest.raises(UserError, match=r"--data wikitext:wikitext-103-raw-v1: could not load the Hub dataset"):
        load_corpus("wikitext:wikitext-103-raw-v1")
