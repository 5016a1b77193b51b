"""A smoke run of run_flax_glue.py with a tiny ALBERT (one shared layer, embeddings narrower than the hidden size):
it learns the tiny sentence-pair task and exports a classifier that PyTorch loads whole."""

import run_flax_glue
from tests import tiny


def test_albert_learns_the_pair_task(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    model = tmp_path / "model"
    tiny.make_roberta(model, tiny.write_corpus(tmp_path / "corpus.txt"))  # its tokenizer; the config is replaced
    tokenizer = AutoTokenizer.from_pretrained(model)
    AutoConfig.for_model("albert", vocab_size=len(tokenizer), embedding_size=16, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                         initializer_range=0.1, pad_token_id=tokenizer.pad_token_id, bos_token_id=0,
                         eos_token_id=2).save_pretrained(model)
    tiny.write_pairs(tmp_path / "train.csv", 600, seed=0)
    tiny.write_pairs(tmp_path / "valid.csv", 90, seed=1)
    out = tmp_path / "run"
    run_flax_glue.main([f"--output_dir={out}", "--do_train", "--do_eval", f"--train_file={tmp_path / 'train.csv'}",
                        f"--validation_file={tmp_path / 'valid.csv'}", f"--config_name={model}",
                        f"--tokenizer_name={model}", "--max_seq_length=32", "--learning_rate=3e-3",
                        "--warmup_steps=10", "--max_steps=100", "--logging_steps=20", "--eval_steps=100",
                        "--save_steps=100", "--per_device_train_batch_size=16"])

    results = tiny.read_json(out / "eval_results.json")
    assert results["eval_accuracy"] > 0.9 and results["eval_samples"] == 90, results
    losses = [loss for _, loss, _ in tiny.loss_curve(out)]
    assert losses[-1] < losses[0] / 5, losses
    assert tiny.read_json(out / "config.json")["architectures"] == ["AlbertForSequenceClassification"]

    from transformers import AlbertForSequenceClassification

    _, info = AlbertForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
