"""The language model compress trains itself (fixture wiki-llama): its tokenizer starts every text with BOS and
round-trips text, its windows are BOS plus the text stream, and training really lowers the loss, here on a tiny
shape in seconds (the fixture's own shape trains for minutes and is built only on request)."""

from compressor import trained_lm

from .conftest import WORDS

TEXTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(30)) for i in range(60)]


def test_tokenizer_round_trips_and_windows_start_with_bos():
    tokenizer = trained_lm.train_tokenizer(TEXTS, 300)
    ids = tokenizer("the film was good")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == "the film was good"
    windows = trained_lm.training_windows(tokenizer, TEXTS, 16)
    assert windows.shape[1] == 16 and bool((windows[:, 0] == tokenizer.bos_token_id).all())
    stream = [i for text in TEXTS for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert windows[:, 1:].flatten().tolist() == stream[:windows.shape[0] * 15]  # the stream, in order


def test_training_lowers_held_out_perplexity_and_unties_the_head():
    tokenizer = trained_lm.train_tokenizer(TEXTS, 300)
    shape = trained_lm.Shape(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    schedule = trained_lm.Schedule(window=16, batch_size=8, learning_rate=1e-2, max_steps=40)
    windows = trained_lm.training_windows(tokenizer, TEXTS, schedule.window)
    model = trained_lm.build_model(shape, tokenizer, schedule.seed)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    before = trained_lm.held_out_perplexity(model, windows[-8:])
    losses = trained_lm.train(model, windows[:-8], schedule)
    after = trained_lm.held_out_perplexity(model, windows[-8:])
    assert len(losses) == 40 and not model.training
    assert after < before / 3, (before, after)  # from about the vocabulary's size (a uniform guess)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
