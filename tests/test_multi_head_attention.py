"""nio_fast.ops.multi_head_attention: a batch-preserving drop-in for F.multi_head_attention_forward.

Checks that it computes what PyTorch computes (outputs, attention weights, gradients for every
parameter and input, fp64 and fp32) over masks / projections / layouts, that every F.linear it
issues gets a module parameter as weight and a 3-D input whose axis 1 is the batch, that it plugs
into nn.MultiheadAttention / nn.TransformerEncoderLayer through a TorchFunctionMode, and that it
answers NotImplemented for what it does not support.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


att = importlib.import_module("nio_fast.ops.multi_head_attention")

pytestmark = [
    pytest.mark.filterwarnings("ignore:Support for mismatched"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Hundreds of tiny problems: intra-op threads only add contention on a shared machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

T, S, N, E, H = 5, 7, 3, 12, 3
KDIM, VDIM = 8, 10
DTYPES = (torch.float64, torch.float32)
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}

MASKS = (
    "none",
    "bool2d",
    "float2d",
    "bool3d",
    "float3d",
    "kpm",
    "kpm_bool2d",
    "kpm_float3d",
    "causal",
    "causal_kpm",
)
WEIGHT_MODES = (  # (need_weights, average_attn_weights)
    (False, True),
    (True, True),
    (True, False),
)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _close(got, ref, dtype, what=""):
    if ref is None:
        assert got is None, what
        return
    assert got is not None, what
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert torch.isfinite(ref).all(), what
    scale = max(1.0, ref.abs().max().item())
    err = (got - ref).abs().max().item()
    assert err <= TOL[dtype] * scale, (what, err, scale)


def _randomize(module, std=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)


def _masks(kind, tgt, src, dtype):
    """(attn_mask, key_padding_mask, is_causal); key 0 is never masked, so no row is empty."""
    g = torch.Generator().manual_seed(7)
    kpm = None
    if kind.startswith("kpm") or kind == "causal_kpm":
        kpm = torch.zeros(N, src, dtype=torch.bool)
        kpm[0, -2:] = True
        kpm[2, -1] = True

    def bool_mask(shape):
        m = torch.rand(shape, generator=g) < 0.4
        m[..., 0] = False
        return m

    def float_mask(shape):
        m = torch.randn(shape, generator=g).to(dtype)
        return m.masked_fill(bool_mask(shape), float("-inf"))

    attn, causal = None, False
    if kind.endswith("bool2d"):
        attn = bool_mask((tgt, src))
    elif kind.endswith("float2d"):
        attn = torch.randn(tgt, src, generator=g).to(dtype)
    elif kind.endswith("bool3d"):
        attn = bool_mask((N * H, tgt, src))
    elif kind.endswith("float3d"):
        attn = float_mask((N * H, tgt, src))
    elif kind.startswith("causal"):
        attn = torch.triu(torch.full((tgt, src), float("-inf"), dtype=dtype), diagonal=1)
        causal = True
    return attn, kpm, causal


class Redirect(TorchFunctionMode):
    """Sends F.multi_head_attention_forward to ours; PyTorch's runs on NotImplemented."""

    def __init__(self):
        super().__init__()
        self.hits = 0
        self.fallbacks = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            out = att.multi_head_attention_forward(*args, **kwargs)
            if out is not NotImplemented:
                self.hits += 1
                return out
            self.fallbacks += 1
        return func(*args, **kwargs)


class LinearRecorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            self.calls.append((x, w, b, out))
        return out


def _grads(outputs, wrt, seed=11):
    outputs = [o for o in outputs if o is not None]
    torch.manual_seed(seed)
    ups = [torch.randn_like(o) for o in outputs]
    return torch.autograd.grad(outputs, wrt, ups)


def _functional_args(dtype, kind, bias, seed=0):
    """Seq-first inputs and parameters for a direct functional call.

    kind: "packed" (self-attention, packed in_proj_weight), "separate_cross" (kdim/vdim != E),
    "separate_self" (use_separate_proj_weight with query is key is value).
    """
    torch.manual_seed(seed)
    kw = dict(dtype=dtype, requires_grad=True)
    p = {
        "out_proj_weight": torch.randn(E, E, **kw),
        "out_proj_bias": torch.randn(E, **kw) if bias else None,
        "in_proj_bias": torch.randn(3 * E, **kw) if bias else None,
    }
    if kind == "packed":
        x = torch.randn(T, N, E, **kw)
        q = k = v = x
        inputs = [x]
        p["in_proj_weight"] = torch.randn(3 * E, E, **kw)
        src = T
    elif kind == "separate_self":
        x = torch.randn(T, N, E, **kw)
        q = k = v = x
        inputs = [x]
        p["q_proj_weight"] = torch.randn(E, E, **kw)
        p["k_proj_weight"] = torch.randn(E, E, **kw)
        p["v_proj_weight"] = torch.randn(E, E, **kw)
        src = T
    else:
        q = torch.randn(T, N, E, **kw)
        k = torch.randn(S, N, KDIM, **kw)
        v = torch.randn(S, N, VDIM, **kw)
        inputs = [q, k, v]
        p["q_proj_weight"] = torch.randn(E, E, **kw)
        p["k_proj_weight"] = torch.randn(E, KDIM, **kw)
        p["v_proj_weight"] = torch.randn(E, VDIM, **kw)
        src = S
    with torch.no_grad():
        for t in p.values():
            if t is not None:
                t.mul_(0.3)
    return q, k, v, inputs, p, src


def _call(fn, q, k, v, p, **kw):
    separate = "q_proj_weight" in p
    return fn(
        q,
        k,
        v,
        E,
        H,
        p.get("in_proj_weight"),
        p["in_proj_bias"],
        None,
        None,
        False,
        kw.pop("dropout_p", 0.0),
        p["out_proj_weight"],
        p["out_proj_bias"],
        use_separate_proj_weight=separate,
        q_proj_weight=p.get("q_proj_weight"),
        k_proj_weight=p.get("k_proj_weight"),
        v_proj_weight=p.get("v_proj_weight"),
        **kw,
    )


# ----------------------------------------------------------------------------------------------
# numerics: direct functional calls (bool masks reach the functional only this way)
# ----------------------------------------------------------------------------------------------
def test_sample_axis_constant():
    assert att.sample_axis == 1


@pytest.mark.parametrize("need_weights,average", WEIGHT_MODES)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("kind", ["packed", "separate_cross", "separate_self"])
@pytest.mark.parametrize("bias", [True, False])
def test_functional_matches_torch(kind, bias, mask, need_weights, average):
    for dtype in DTYPES:
        q, k, v, inputs, p, src = _functional_args(dtype, kind, bias)
        attn_mask, kpm, causal = _masks(mask, T, src, dtype)
        kw = dict(
            training=True,
            key_padding_mask=kpm,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average,
            is_causal=causal,
        )
        ref = _call(F.multi_head_attention_forward, q, k, v, p, **kw)
        got = _call(att.multi_head_attention_forward, q, k, v, p, **kw)
        assert got is not NotImplemented
        _close(got[0], ref[0], dtype, "output")
        _close(got[1], ref[1], dtype, "weights")
        wrt = [t for t in p.values() if t is not None] + inputs
        for i, (a, b) in enumerate(zip(_grads(got, wrt), _grads(ref, wrt))):
            _close(a, b, dtype, f"grad {i}")


def test_eval_mode_ignores_dropout():
    q, k, v, inputs, p, src = _functional_args(torch.float64, "packed", True)
    for need_weights in (False, True):
        kw = dict(training=False, need_weights=need_weights, dropout_p=0.25)
        ref = _call(F.multi_head_attention_forward, q, k, v, p, **dict(kw))
        got = _call(att.multi_head_attention_forward, q, k, v, p, **dict(kw))
        _close(got[0], ref[0], torch.float64)
        _close(got[1], ref[1], torch.float64)


def test_mismatched_mask_dtypes_warn_like_torch():
    q, k, v, inputs, p, src = _functional_args(torch.float64, "packed", True)
    attn_mask, kpm, _ = _masks("kpm_float3d", T, src, torch.float64)
    with pytest.warns(UserWarning, match="Support for mismatched key_padding_mask and attn_mask"):
        got = _call(att.multi_head_attention_forward, q, k, v, p, key_padding_mask=kpm, attn_mask=attn_mask)
    ref = _call(F.multi_head_attention_forward, q, k, v, p, key_padding_mask=kpm, attn_mask=attn_mask)
    _close(got[0], ref[0], torch.float64)
    _close(got[1], ref[1], torch.float64)


# ----------------------------------------------------------------------------------------------
# numerics: nn.MultiheadAttention with its functional call redirected through a mode
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("need_weights,average", WEIGHT_MODES)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("kind", ["self", "cross"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_module_matches_torch(batch_first, bias, kind, mask, need_weights, average):
    for dtype in DTYPES:
        torch.manual_seed(0)
        extra = dict(kdim=KDIM, vdim=VDIM) if kind == "cross" else {}
        mha = nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first, dtype=dtype, **extra)
        _randomize(mha)
        src = S if kind == "cross" else T

        def shape(length, d):
            return (N, length, d) if batch_first else (length, N, d)

        if kind == "self":
            x = torch.randn(shape(T, E), dtype=dtype, requires_grad=True)
            q = k = v = x
            inputs = [x]
        else:
            q = torch.randn(shape(T, E), dtype=dtype, requires_grad=True)
            k = torch.randn(shape(S, KDIM), dtype=dtype, requires_grad=True)
            v = torch.randn(shape(S, VDIM), dtype=dtype, requires_grad=True)
            inputs = [q, k, v]
        attn_mask, kpm, causal = _masks(mask, T, src, dtype)

        def run():
            return mha(
                q,
                k,
                v,
                key_padding_mask=kpm,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average,
                is_causal=causal,
            )

        ref = run()
        with Redirect() as mode:
            got = run()
        assert (mode.hits, mode.fallbacks) == (1, 0)
        _close(got[0], ref[0], dtype, "output")
        _close(got[1], ref[1], dtype, "weights")
        wrt = list(mha.parameters()) + inputs
        for i, (a, b) in enumerate(zip(_grads(got, wrt), _grads(ref, wrt))):
            _close(a, b, dtype, f"grad {i}")


# ----------------------------------------------------------------------------------------------
# structure: what every F.linear receives
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("kind", ["self", "cross"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_linear_calls_keep_batch_axis_and_parameters(batch_first, bias, kind, need_weights):
    torch.manual_seed(0)
    extra = dict(kdim=KDIM, vdim=VDIM) if kind == "cross" else {}
    mha = nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first, dtype=torch.float64, **extra)
    _randomize(mha)
    params = list(mha.parameters())

    def shape(length, d):
        return (N, length, d) if batch_first else (length, N, d)

    if kind == "self":
        q = k = v = torch.randn(shape(T, E), dtype=torch.float64)
    else:
        q = torch.randn(shape(T, E), dtype=torch.float64)
        k = torch.randn(shape(S, KDIM), dtype=torch.float64)
        v = torch.randn(shape(S, VDIM), dtype=torch.float64)
    if batch_first:  # what nn.MultiheadAttention passes on: seq-first, "is" preserved
        if kind == "self":
            q = k = v = q.transpose(0, 1)
        else:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    attn_mask, kpm, causal = _masks("kpm_float3d", T, S if kind == "cross" else T, torch.float64)

    args = (
        q,
        k,
        v,
        E,
        H,
        mha.in_proj_weight,
        mha.in_proj_bias,
        None,
        None,
        False,
        0.0,
        mha.out_proj.weight,
        mha.out_proj.bias,
    )
    kw = dict(
        key_padding_mask=kpm,
        attn_mask=attn_mask,
        need_weights=need_weights,
        use_separate_proj_weight=kind == "cross",
        q_proj_weight=mha.q_proj_weight,
        k_proj_weight=mha.k_proj_weight,
        v_proj_weight=mha.v_proj_weight,
    )
    with LinearRecorder() as rec:
        out, _ = att.multi_head_attention_forward(*args, **kw)
    assert len(rec.calls) == (2 if kind == "self" else 4)
    expected_weights = (
        [mha.in_proj_weight, mha.out_proj.weight]
        if kind == "self"
        else [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight, mha.out_proj.weight]
    )
    for (x, w, b, y), want in zip(rec.calls, expected_weights):
        assert w is want
        assert any(w is p for p in params)
        assert x.dim() == 3 and x.shape[att.sample_axis] == N
        assert y.dim() == 3 and y.shape[att.sample_axis] == N
        if b is not None:
            # The packed and output biases are the parameters; separate q/k/v biases are
            # chunks (views) of in_proj_bias.
            assert any(b is p for p in params) or b._base is mha.in_proj_bias
        else:
            assert not bias
    assert rec.calls[-1][3].shape == (T, N, E)
    # The projection inputs are the caller's tensors, as they are where contiguous, else one
    # contiguous copy (which F.linear's graph and a recorder then share).
    inputs = [q] if kind == "self" else [q, k, v]
    for (x, *_), given in zip(rec.calls, inputs):
        assert x.is_contiguous() and torch.equal(x, given)
        assert (x is given) == given.is_contiguous()


# ----------------------------------------------------------------------------------------------
# nn.TransformerEncoderLayer, the engine's way: a mode redirecting the functional call
# ----------------------------------------------------------------------------------------------
class RecordingRedirect(TorchFunctionMode):
    """One mode that both redirects MHA to ours and records every F.linear (including ours)."""

    def __init__(self):
        super().__init__()
        self.hits = 0
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            # The mode is popped while it handles a call; push it back so that the F.linear
            # calls made by our function are seen by it too.
            with self:
                out = att.multi_head_attention_forward(*args, **kwargs)
            if out is not NotImplemented:
                self.hits += 1
                return out
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if func is F.linear:
            self.calls.append((args[0], args[1], out))
        return out


@pytest.mark.parametrize("masks", ["none", "kpm_causal"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer(norm_first, train, masks):
    for dtype in DTYPES:
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(
            d_model=E,
            nhead=4,
            dim_feedforward=20,
            dropout=0.0,
            batch_first=True,
            norm_first=norm_first,
            dtype=dtype,
        )
        _randomize(layer)
        layer.train(train)
        x = torch.randn(N, T, E, dtype=dtype, requires_grad=True)
        kw = {}
        if masks == "kpm_causal":
            kpm = torch.zeros(N, T, dtype=torch.bool)
            kpm[0, -2:] = True
            kw = dict(
                src_mask=nn.Transformer.generate_square_subsequent_mask(T, dtype=dtype),
                src_key_padding_mask=kpm,
                is_causal=True,
            )
        ref = layer(x, **kw)
        with Redirect() as mode:
            got = layer(x, **kw)
        assert (mode.hits, mode.fallbacks) == (1, 0)
        _close(got, ref, dtype, "output")
        wrt = list(layer.parameters()) + [x]
        for i, (a, b) in enumerate(zip(_grads([got], wrt), _grads([ref], wrt))):
            _close(a, b, dtype, f"grad {i}")

        # One mode that redirects and records: sees the attention projections with the sample
        # axis at 1 and the feed-forward ones (batch_first input) with it at 0.
        with RecordingRedirect() as rmode:
            got2 = layer(x, **kw)
        assert rmode.hits == 1
        _close(got2, ref, dtype, "output (recording mode)")
        attn_params = [layer.self_attn.in_proj_weight, layer.self_attn.out_proj.weight]
        seen = [w for _, w, _ in rmode.calls]
        for p in attn_params + [layer.linear1.weight, layer.linear2.weight]:
            assert sum(w is p for w in seen) == 1
        for inp, w, out in rmode.calls:
            assert inp.dim() == 3 and out.dim() == 3
            if any(w is p for p in attn_params):
                assert inp.shape[att.sample_axis] == N and out.shape[att.sample_axis] == N
            else:
                assert inp.shape[0] == N

        if not train:
            # Under no_grad in eval mode PyTorch would take its fused fast path; an active mode
            # disables it, so the redirect still happens and gives the slow path's numbers.
            with torch.no_grad(), Redirect() as mode:
                got3 = layer(x.detach(), **kw)
            assert mode.hits == 1
            _close(got3, ref.detach(), dtype, "output (no_grad eval)")


# ----------------------------------------------------------------------------------------------
# unsupported configurations answer NotImplemented (and PyTorch's own function still runs)
# ----------------------------------------------------------------------------------------------
def _base_args():
    q, k, v, inputs, p, src = _functional_args(torch.float64, "packed", True)
    args = [q, k, v, E, H, p["in_proj_weight"], p["in_proj_bias"], None, None, False, 0.0,
            p["out_proj_weight"], p["out_proj_bias"]]
    return args, {}


def _unsupported_cases():
    torch.manual_seed(3)
    cases = {}

    args, kw = _base_args()
    other = torch.randn(T, N, E, dtype=torch.float64)
    a = list(args)
    a[0] = other  # packed weights, query is not key (encoder-decoder attention)
    cases["packed_cross_q"] = (a, kw)
    a = list(args)
    a[2] = other.clone()  # key is not value
    cases["packed_kv_distinct"] = (a, kw)
    a = list(args)
    a[0], a[1], a[2] = other, other.clone(), other.clone()
    cases["packed_all_distinct"] = (a, kw)

    a = list(args)
    a[7] = torch.randn(1, 1, E, dtype=torch.float64)
    a[8] = torch.randn(1, 1, E, dtype=torch.float64)
    cases["bias_kv"] = (a, kw)

    a = list(args)
    a[9] = True
    cases["add_zero_attn"] = (a, kw)

    static = torch.randn(N * H, T, E // H, dtype=torch.float64)
    cases["static_kv"] = (list(args), dict(static_k=static, static_v=static.clone()))
    cases["static_k"] = (list(args), dict(static_k=static))

    a = list(args)
    a[10] = 0.1
    cases["dropout_training"] = (a, dict(training=True))

    a = list(args)
    x2 = args[0].detach()[:, 0].clone()
    a[0] = a[1] = a[2] = x2
    cases["unbatched"] = (a, {})

    a = list(args)
    nested = torch.nested.nested_tensor(
        [torch.randn(T, E, dtype=torch.float64), torch.randn(T + 1, E, dtype=torch.float64)]
    )
    a[0] = a[1] = a[2] = nested
    cases["nested"] = (a, {})
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "packed_cross_q",
        "packed_kv_distinct",
        "packed_all_distinct",
        "bias_kv",
        "add_zero_attn",
        "static_kv",
        "static_k",
        "dropout_training",
        "unbatched",
        "nested",
    ],
)
def test_unsupported_returns_notimplemented(case):
    args, kw = _unsupported_cases()[case]
    assert att.multi_head_attention_forward(*args, **kw) is NotImplemented


def test_invalid_arguments_left_to_torch():
    args, kw = _base_args()
    # is_causal without attn_mask: PyTorch raises; we step aside so that it does.
    assert att.multi_head_attention_forward(*args, is_causal=True) is NotImplemented
    with pytest.raises(RuntimeError):
        F.multi_head_attention_forward(*args, is_causal=True)
    a = list(args)
    a[3] = E + 1  # embed_dim_to_check mismatch
    assert att.multi_head_attention_forward(*a) is NotImplemented
    bad_mask = torch.zeros(T + 1, T, dtype=torch.bool)
    assert att.multi_head_attention_forward(*args, attn_mask=bad_mask) is NotImplemented


def test_module_falls_back_for_unsupported():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, add_bias_kv=True, dtype=torch.float64)
    _randomize(mha)
    x = torch.randn(T, N, E, dtype=torch.float64)
    ref = mha(x, x, x)
    with Redirect() as mode:
        got = mha(x, x, x)
    assert (mode.hits, mode.fallbacks) == (0, 1)
    _close(got[0], ref[0], torch.float64)
    _close(got[1], ref[1], torch.float64)


class MeanOverPositions(nn.Module):
    def forward(self, x):
        return x.mean(1)


def _saved_bytes(root) -> int:
    """Bytes of the distinct storages the graph behind ``root`` keeps for its backward."""
    storages, seen, pending = {}, set(), [root]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        saved = [getattr(node, name) for name in dir(node) if name.startswith("_saved_")]
        saved += list(getattr(node, "saved_tensors", ()))
        for tensor in saved:
            if isinstance(tensor, torch.Tensor):
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        pending += [next_node for next_node, _ in node.next_functions]
    return sum(storages.values())


def test_batch_first_layers_keep_one_copy_of_the_projections_factors():
    """A batch-first layer hands the in-projection a [T, N, E] view of its input and takes the
    out-projection's gradient back as one; F.linear would copy each into rows for its graph
    while the sample-wise engine keeps the originals. Made contiguous up front, one copy serves
    both: two activations less per layer in the graph the double backward keeps."""
    import nio_fast

    torch.manual_seed(0)
    num, positions, width, layers = 6, 5, 8, 2
    layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, layers, enable_nested_tensor=False), MeanOverPositions(),
                          nn.Linear(width, 3)).double()
    batch = torch.randn(num, positions, width, dtype=torch.float64), torch.randint(0, 3, (num,))
    params = list(model.parameters())

    def evaluation():
        result = nio_fast.gradcosine(model, batch, sub_batches="samples", mode="factors", create_graph=True)
        return _saved_bytes(result.value.grad_fn), result.value, torch.autograd.grad(result.value, params)

    one_copy, value, grads = evaluation()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(att, "_sequence_major", lambda x: x)
        patch.setattr(att, "_sequence_major_gradient", lambda x: x)
        two_copies, copied_value, copied_grads = evaluation()
    assert two_copies - one_copy == 2 * layers * num * positions * width * 8, (one_copy, two_copies)
    _close(value, copied_value, torch.float64)
    for mine, theirs in zip(grads, copied_grads):
        _close(mine, theirs, torch.float64)
