"""Nanbeige checkpoints (issue 28): import against a reference built from transformers'
Llama modules, exact decoding in every dtype, refused features, round trip, tokenizer
and chat with the thinking switch, the server, and fitting the exit readout.

The checkpoints are laid out by this file in the published format (config.json with
Nanbeige's field names, tensors under ``NanbeigeForCausalLM``'s names, stored rotary
buffers, a tokenizer and a ChatML template with ``enable_thinking``); nothing here is
written by speedec's exporter except in the round-trip test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from helpers import (  # noqa: F401 (one_thread: a fixture)
    check_speed_on_random_prompt,
    edit_config,
    edit_tensors,
    one_thread,
    random_model,
    run_cli,
    serve_requests,
    vary_norm_gains,
)
from speedec import LoopedLM, ModelLoadError, chat_prompt, export_hf, generate
from speedec.architectures.nanbeige import UNSUPPORTED
from speedec.tokenizer import load_tokenizer, prompt_ids, render_chat
from test_engines import configs

# The shapes of the fixtures: head_dim 16 with hidden 48 and 4 heads (48 / 4 = 12),
# so that q and o are not square, as in Nanbeige4.2-3B (128 with 3072 / 48 = 64).
SHAPE = dict(vocab_size=320, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
             rope_theta=70000.0)
# (name, config fields): as released (2 loops, final norm between loops), three loops,
# the final norm only at the end, and a loop count from loop_loss_weights (len + 1).
VARIANTS = {
    "released": dict(num_loops=2, skip_loop_final_norm=False),
    "three-loops": dict(num_loops=3, skip_loop_final_norm=False),
    "skip-norm": dict(num_loops=2, skip_loop_final_norm=True),
    "loss-weights": dict(num_loops=1, loop_loss_weights=[0.25, 0.25], skip_loop_final_norm=False),
}
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a test model.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}{%- endif %}")
SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"]
BOS, EOS = 1, 2  # <|im_start|>, <|im_end|>




def write_tokenizer(directory: Path) -> None:
    """A small BPE in the checkpoint's layout: Metaspace pre-tokenizer (a space marker
    before the first word), special tokens first (bos <|im_start|> = 1, eos <|im_end|> = 2),
    ``add_bos_token`` in tokenizer_config.json, a ChatML template with the thinking switch."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    text = ["the cat sat on the mat and thought about the answer to two plus two",
            "you are a test model; a system prompt, a user turn and an assistant turn"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False))
    assert tok.token_to_id("<|im_start|>") == BOS and tok.token_to_id("<|im_end|>") == EOS
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<unk>", "tokenizer_class": "LlamaTokenizer", "chat_template": CHAT_TEMPLATE}))
    (directory / "generation_config.json").write_text(json.dumps({
        "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": 0, "do_sample": True, "temperature": 0.6}))


def write_checkpoint(directory: Path, variant: str = "released", *, seed: int = 0,
                     dtype: torch.dtype = torch.float32, tokenizer: bool = True, branch_std: float = 0.3,
                     **overrides) -> Path:
    """A random Nanbeige checkpoint in the published layout (tensors under their names,
    stored ``rotary_emb.inv_freq`` buffers holding garbage, as meta-device saves leave them).
    ``branch_std``: the scale of the branches' output projections (small: the second loop
    changes the prediction less, so drafts from the first are accepted more often)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["NanbeigeForCausalLM"], "model_type": "nanbeige", "hidden_act": "silu",
              "tie_word_embeddings": False, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
              "torch_dtype": str(dtype).replace("torch.", ""), "bos_token_id": BOS, "eos_token_id": EOS,
              "pad_token_id": 0, **SHAPE, **VARIANTS[variant], **overrides}
    g = torch.Generator().manual_seed(seed)
    D, F, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    H, Hkv, V = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]

    def normal(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def gain(n):
        return (1 + 0.3 * torch.randn(n, generator=g)).to(dtype)

    tensors = {"model.embed_tokens.weight": normal(V, D, std=1.0), "model.norm.weight": gain(D),
               "lm_head.weight": normal(V, D, std=0.5)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": gain(D), p + "post_attention_layernorm.weight": gain(D),
            p + "self_attn.q_proj.weight": normal(H * hd, D, std=0.3),
            p + "self_attn.k_proj.weight": normal(Hkv * hd, D, std=0.3),
            p + "self_attn.v_proj.weight": normal(Hkv * hd, D, std=0.3),
            p + "self_attn.o_proj.weight": normal(D, H * hd, std=branch_std),
            p + "mlp.gate_proj.weight": normal(F, D, std=0.3), p + "mlp.up_proj.weight": normal(F, D, std=0.3),
            p + "mlp.down_proj.weight": normal(D, F, std=branch_std),
            p + "self_attn.rotary_emb.inv_freq": torch.full((hd // 2,), 7.0)})
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        write_tokenizer(directory)
    return directory


class FullPrecisionRMSNorm(torch.nn.Module):
    """RMSNorm in the input's own dtype (transformers' computes in float32 whatever the
    input, which would hide float64 differences behind float32 rounding)."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(weight.clone()), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Reference(torch.nn.Module):
    """Nanbeige's forward written from transformers' Llama modules (decoder layers, rotary
    embedding) on the checkpoint's own tensors; it shares no code with speedec.
    The loop: every layer ``loops`` times over the same weights, ``model.norm`` after every
    loop unless ``skip_loop_final_norm`` (then once at the end), then ``lm_head``."""

    def __init__(self, directory: Path, dtype: torch.dtype = torch.float64) -> None:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        super().__init__()
        data = json.loads((directory / "config.json").read_text())
        tensors = load_file(str(directory / "model.safetensors"))
        config = LlamaConfig(
            vocab_size=data["vocab_size"], hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"], num_hidden_layers=data["num_hidden_layers"],
            num_attention_heads=data["num_attention_heads"], num_key_value_heads=data["num_key_value_heads"],
            head_dim=data["head_dim"], rms_norm_eps=data["rms_norm_eps"],
            max_position_embeddings=data["max_position_embeddings"],
            rope_parameters={"rope_type": "default", "rope_theta": data["rope_theta"]})
        config._attn_implementation = "sdpa"  # eager would take its softmax in float32
        self.layers = torch.nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{i}."
            layer.load_state_dict({name[len(prefix):]: t for name, t in tensors.items()
                                   if name.startswith(prefix) and not name.endswith("inv_freq")})
        self.layers.to(dtype)
        for layer in self.layers:
            for name in ("input_layernorm", "post_attention_layernorm"):
                setattr(layer, name, FullPrecisionRMSNorm(getattr(layer, name).weight.data, config.rms_norm_eps))
        self.norm = FullPrecisionRMSNorm(tensors["model.norm.weight"].to(dtype), config.rms_norm_eps)
        self.embed = tensors["model.embed_tokens.weight"].to(dtype)
        self.lm_head = tensors["lm_head.weight"].to(dtype)
        self.rotary = LlamaRotaryEmbedding(config)
        weights = data.get("loop_loss_weights") or []
        self.loops = len(weights) + 1 if weights else data["num_loops"]
        self.skip = data["skip_loop_final_norm"]

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """``[T, V]`` logits of every position (no cache: the whole sequence each time)."""
        x = self.embed[torch.tensor(ids)][None]
        T = len(ids)
        positions = torch.arange(T)[None]
        angles = self.rotary(x, positions)
        mask = torch.full((T, T), float("-inf"), dtype=x.dtype).triu(1)[None, None]
        for _ in range(self.loops):
            for layer in self.layers:
                x = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=angles)
            if not self.skip:
                x = self.norm(x)
        if self.skip:
            x = self.norm(x)
        return (x @ self.lm_head.T)[0]

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], float]:
        """``n`` greedy tokens and the smallest top-2 logit gap met on the way."""
        ids, out, gap = list(ids), [], float("inf")
        for _ in range(n):
            top = self.logits(ids)[-1].topk(2).values
            gap = min(gap, float(top[0] - top[1]))
            token = int(self.logits(ids)[-1].argmax())
            ids.append(token)
            out.append(token)
        return out, gap


PROMPTS = ([5, 17, 42, 9, 88, 130], [200, 3, 3, 71])


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp(request.param), request.param), request.param


def test_config_mapping(checkpoint):
    directory, variant = checkpoint
    c = LoopedLM.from_pretrained(directory).config
    loops = {"released": 2, "three-loops": 3, "skip-norm": 2, "loss-weights": 3}[variant]
    assert (c.architecture, c.n_unique_layers, c.n_loops, c.exit_loop) == ("nanbeige", 2, loops, 1)
    assert (c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim) == (48, 4, 2, 16, 80)
    assert (c.vocab_size, c.max_seq_len, c.rope_theta, c.norm_eps, c.tie_embeddings) == (320, 256, 7e4, 1e-5, False)
    assert c.skip_loop_final_norm == (variant == "skip-norm") and c.loop_norm == (variant != "skip-norm")


def test_logits_match_reference(checkpoint):
    directory, _ = checkpoint
    model = LoopedLM.from_pretrained(directory, dtype=torch.float64)
    reference = Reference(directory)
    for ids in PROMPTS:
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(ours, reference.logits(ids), atol=1e-9, rtol=0)


def test_incremental_decoding_matches_reference_greedy(checkpoint):
    """The engines decode through the KV cache (per loop and layer) what the reference
    computes on the whole sequence: the same greedy tokens, with margins far above the
    float64 difference, so the comparison cannot flip by rounding."""
    directory, _ = checkpoint
    model = LoopedLM.from_pretrained(directory, dtype=torch.float64)
    reference = Reference(directory)
    for ids in PROMPTS:
        expected, gap = reference.greedy(ids, 12)
        assert gap > 1e-6 and len(set(expected)) > 3
        for engine, options in (("autoregressive", {}), ("speed", {}), ("speed", {"early_correction": True}),
                                ("speed", {"guesses": 2}), ("self-speculative", {"draft_tokens": 3})):
            assert generate(model, ids, 12, engine=engine, **options).tokens == expected, (engine, options)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.int8])
def test_engines_equal_autoregressive_in_every_dtype(tmp_path, dtype):
    directory = write_checkpoint(tmp_path / "nb", "released", tokenizer=False, branch_std=0.02)
    model = LoopedLM.from_pretrained(directory, dtype=dtype)
    accepted = rejected = 0
    for ids in PROMPTS:
        expected = generate(model, ids, 40, engine="autoregressive").tokens
        for engine, options in (("speed", {}), ("speed", {"early_correction": True, "guesses": 3}),
                                ("self-speculative", {"draft_tokens": 3})):
            out = generate(model, ids, 40, engine=engine, **options)
            assert out.tokens == expected, (engine, options)
            accepted += out.stats.drafts_accepted
            rejected += out.stats.drafts_rejected
    assert accepted > 0 and rejected > 0  # both paths of the pipeline were taken


def nanbeige_configs():
    """test_engines' random configs as Nanbeige-style models: non-square heads, the loop
    norm on or off."""
    return st.tuples(configs(), st.booleans(), st.sampled_from([None, 8, 12])).map(
        lambda t: t[0].replace(architecture="nanbeige", loop_embedding=False, skip_loop_final_norm=t[1],
                               attention_head_dim=t[2]))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=nanbeige_configs(), seed=st.integers(0, 2**16), data=st.data())
def test_speed_equals_autoregressive_float64_random_nanbeige(config, seed, data):
    model = random_model(config, seed=seed, std=data.draw(st.sampled_from([0.3, 0.7, 1.5])),
                         residual_scale=data.draw(st.sampled_from([1.0, 4.0, 10.0])))
    vary_norm_gains(model, seed)
    prompt = check_speed_on_random_prompt(model, seed, data)
    n_new = 24
    expected = generate(model, prompt, n_new, engine="autoregressive").tokens
    assert generate(model, prompt, n_new, engine="self-speculative", draft_tokens=3).tokens == expected


def test_server_equals_autoregressive(tmp_path):
    from speedec.serve.requests import ServeRequest

    model = LoopedLM.from_pretrained(write_checkpoint(tmp_path / "nb", "released", tokenizer=False))
    prompts = [list(PROMPTS[i % 2][: 3 + i]) for i in range(6)]
    expected = [generate(model, p, 24, engine="autoregressive").tokens for p in prompts]
    for engine in ("speed", "autoregressive"):
        results, metrics = serve_requests(model, [ServeRequest(p, 24) for p in prompts], concurrency=4,
                                          engine=engine, step_costs=[1.0] * 16)
        assert results == expected, engine
        assert metrics["rows_total"] > metrics["steps_total"]  # rows of several requests shared steps








@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_features_are_refused_by_name(tmp_path, name):
    directory = write_checkpoint(tmp_path / "nb", tokenizer=False)
    edit_config(directory, **{name: [3] if name in ("insert_ngram_layer_idx", "loop_middle_layers") else True})
    with pytest.raises(ModelLoadError, match=name):
        LoopedLM.from_pretrained(directory)
    code, stdout, err = run_cli("generate", "--model", directory, "--prompt-ids", "1,2")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert name in err and "config.json" in err and "Traceback" not in err + stdout


@pytest.mark.parametrize("break_it, message", [
    (lambda d: edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
     "lacks tensor(s): model.layers.1.mlp.up_proj.weight"),
    (lambda d: edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(48, 48)})),
     "has shape (48, 48)"),
    (lambda d: edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)})),
     "no place in speedec for nanbeige tensor(s) model.layers.0.self_attn.q_norm.weight"),
    (lambda d: edit_tensors(d, lambda t: t.pop("lm_head.weight")), "lacks tensor(s): lm_head.weight"),
    (lambda d: edit_config(d, rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (lambda d: edit_config(d, hidden_act="gelu"), "hidden_act 'gelu'"),
    (lambda d: edit_config(d, num_loops=0), "num_loops must be an integer >= 1"),
])
def test_broken_checkpoint_is_one_line_error(tmp_path, break_it, message):
    directory = write_checkpoint(tmp_path / "nb", tokenizer=False)
    break_it(directory)
    with pytest.raises(ModelLoadError) as info:
        LoopedLM.from_pretrained(directory)
    assert message in str(info.value) and "\n" not in str(info.value)
    code, _, err = run_cli("generate", "--model", directory, "--prompt-ids", "1,2")
    assert code == 2 and message in err and err.count("\n") == 1


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    single = write_checkpoint(tmp_path / "single", tokenizer=False)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((single / "config.json").read_text())
    tensors = load_file(str(single / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for k, part in enumerate((names[::2], names[1::2])):
        shard = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(sharded / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = LoopedLM.from_pretrained(single).state_dict(), LoopedLM.from_pretrained(sharded).state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_export_round_trip_is_bit_exact(tmp_path, dtype):
    source = write_checkpoint(tmp_path / "nb", "released", dtype=dtype, tokenizer=False)
    model = LoopedLM.from_pretrained(source)
    assert model.dtype == dtype  # a bf16 checkpoint stays bf16
    out = export_hf(model, tmp_path / "export")
    written, original = load_file(str(out / "model.safetensors")), load_file(str(source / "model.safetensors"))
    # Everything but the stored rotary buffers, which speedec computes.
    assert sorted(written) == sorted(n for n in original if not n.endswith("inv_freq"))
    for name, tensor in written.items():
        assert tensor.dtype == dtype and torch.equal(tensor, original[name]), name
    config, source_config = json.loads((out / "config.json").read_text()), json.loads((source / "config.json").read_text())
    for key in ("model_type", "num_loops", "skip_loop_final_norm", "head_dim", "num_hidden_layers", "rope_theta",
                "tie_word_embeddings", "num_key_value_heads"):
        assert config[key] == source_config[key], key
    assert config["architectures"] == ["NanbeigeForCausalLM"] and config["loop_loss_weights"] == []
    again = LoopedLM.from_pretrained(out)
    assert again.config == model.config
    assert all(torch.equal(again.state_dict()[n], t) for n, t in model.state_dict().items())
    # speedec's own format keeps the architecture, the loop norm and the head width.
    model.save_pretrained(tmp_path / "native")
    assert LoopedLM.from_pretrained(tmp_path / "native").config == model.config


# ------------------------------------------------------------------ tokens and chat

@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("chat"), "released")


def test_text_prompt_starts_with_bos_once(chat_model):
    tok = load_tokenizer(chat_model, 320)
    assert tok.bos_token_id == BOS and tok.eos_token_id == EOS
    ids = prompt_ids(tok, "the cat sat")
    assert ids[0] == BOS and ids[1:] == tok.encode("the cat sat") and BOS not in ids[1:]
    assert prompt_ids(tok, "<|im_start|>user") == tok.encode("<|im_start|>user")  # never twice
    code, stdout, err = run_cli("generate", "--model", chat_model, "the cat sat", "--max-new-tokens", 3, "--json")
    assert code == 0, err
    assert json.loads(stdout)["prompt_ids"] == ids


def test_chat_template_thinking_switch(chat_model):
    on = render_chat(chat_model, "two plus two?")
    off = render_chat(chat_model, "two plus two?", {"enable_thinking": False})
    start = "<|im_start|>system\nYou are a test model.<|im_end|>\n<|im_start|>user\ntwo plus two?<|im_end|>\n"
    assert on == start + "<|im_start|>assistant\n<think>\n"
    assert off == start + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = chat_prompt(chat_model, "two plus two?")
    # The template writes the start token itself; the tokenizer adds no second one.
    assert ids[0] == BOS and ids.count(BOS) == 3 and ids[1] != BOS


def test_cli_chat_thinking_and_stop_at_im_end(tmp_path, chat_model):
    """--chat applies the template (thinking on unless --no-thinking); generation stops at
    <|im_end|> (a copy whose head prefers it after a few tokens)."""
    for flags, options in (((), None), (("--no-thinking",), {"enable_thinking": False})):
        ids = chat_prompt(chat_model, "two plus two?", options)
        model = LoopedLM.from_pretrained(chat_model)
        first = generate(model, ids, 3, engine="autoregressive").tokens
        with torch.no_grad():  # <|im_end|> reads like the third token, twice as loud
            model.lm_head[EOS] = 2 * model.lm_head[first[2]]
        expected = generate(model, ids, 20, engine="autoregressive", eos_token_id=EOS)
        assert expected.stop_reason == "eos" and expected.tokens[-1] == EOS
        out = export_hf(model, tmp_path / f"chat{len(flags)}")
        write_tokenizer(out)
        code, stdout, err = run_cli("generate", "--model", out, "--chat", "two plus two?", *flags,
                                "--max-new-tokens", 20, "--json")
        assert code == 0, err
        result = json.loads(stdout)
        assert result["prompt_ids"] == ids
        assert result["tokens"] == expected.tokens and result["stop_reason"] == "eos"
        assert result["text"].endswith("<|im_end|>")
    code, _, err = run_cli("generate", "--model", chat_model, "hi", "--no-thinking")
    assert code == 2 and "--chat" in err


def test_server_chat_thinking_switch(chat_model):
    from fastapi.testclient import TestClient

    from speedec.serve.app import chat_renderer, create_app
    from speedec.serve.scheduler import Scheduler

    model = LoopedLM.from_pretrained(chat_model)
    scheduler = Scheduler(model)
    scheduler.start()
    try:
        client = TestClient(create_app(scheduler, load_tokenizer(chat_model, 320), model_name="nb",
                                       chat_template=chat_renderer(chat_model), vocab_size=320))
        messages = [{"role": "user", "content": "two plus two?"}]
        for kwargs, options in (({}, None), ({"chat_template_kwargs": {"enable_thinking": False}},
                                             {"enable_thinking": False})):
            ids = chat_prompt(chat_model, messages, options)
            expected = generate(model, ids, 6, engine="autoregressive")
            response = client.post("/v1/chat/completions", json={"model": "nb", "messages": messages,
                                                                 "max_tokens": 6, **kwargs})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["usage"]["prompt_tokens"] == len(ids)
            assert body["choices"][0]["message"]["content"] == load_tokenizer(chat_model, 320).decode(expected.tokens)
        response = client.post("/v1/chat/completions", json={"model": "nb", "messages": messages,
                                                             "chat_template_kwargs": {"messages": 1}})
        assert response.status_code == 400 and "messages" in response.json()["error"]["message"]
        response = client.post("/v1/completions", json={"model": "nb", "prompt": "the cat", "max_tokens": 2})
        assert response.json()["usage"]["prompt_tokens"] == len(prompt_ids(load_tokenizer(chat_model, 320), "the cat"))
    finally:
        assert scheduler.shutdown(5)


# ------------------------------------------------------------------ fitting the drafter

def test_train_exit_on_imported_checkpoint(tmp_path, chat_model):
    """`speedec train-exit` fits the exit readout of an imported checkpoint: the fitted
    model (speedec's format, with the chat files) decodes exactly as before, and the
    checkpoint itself is never overwritten."""
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the cat sat on the mat and thought about the answer"] * 60))
    # How a user measures the acceptance of the untrained loop-1 readout.
    code, stdout, err = run_cli("eval", "--model", chat_model, "--data", text, "--windows", 2, "--seq-len", 32,
                            "--prompts", 2, "--prompt-tokens", 8, "--new-tokens", 8, "--json")
    assert code == 0, err
    measured = json.loads(stdout)
    assert measured["exit_loop"] == 1 and len(measured["agreement_per_loop"]) == 2
    assert 0 <= measured["acceptance"] <= 1
    code, _, err = run_cli("train-exit", "--model", chat_model, "--train", text, "--val", text, "--steps", 3)
    assert code == 2 and "--out" in err and "Traceback" not in err
    out = tmp_path / "fitted"
    code, stdout, err = run_cli("train-exit", "--model", chat_model, "--out", out, "--train", text, "--val", text,
                            "--steps", 6, "--batch-size", 2, "--seq-len", 32, "--rank", 4, "--no-progress",
                            "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["rank"] == 4 and 0 <= report["agreement_after"] <= 1
    fitted = LoopedLM.from_pretrained(out)
    assert fitted.config.architecture == "nanbeige" and fitted.config.exit_readout_rank == 4
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (chat_model / name).read_bytes(), name
    original = LoopedLM.from_pretrained(chat_model, dtype=torch.float32)
    ids = chat_prompt(out, "two plus two?")
    expected = generate(original, ids, 24, engine="autoregressive").tokens
    assert generate(fitted, ids, 24, engine="autoregressive").tokens == expected
    assert generate(fitted, ids, 24, engine="speed").tokens == expected


def test_fresh_readout_reads_the_shared_exit(chat_model):
    """Before fitting, the readout of a loop-norm model reads exactly what the shared
    exit reads (the head on the normed state; no second norm)."""
    from speedec.training.exit_fit import with_readout

    model = LoopedLM.from_pretrained(chat_model, dtype=torch.float64)
    fresh = with_readout(model, 4, 1)
    with torch.no_grad():
        out = fresh(torch.tensor([PROMPTS[0]]), output_loops=(1,), output_draft=True)
    torch.testing.assert_close(out.draft_logits, out.loop_logits[1], atol=1e-12, rtol=0)
