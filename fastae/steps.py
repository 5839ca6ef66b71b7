"""A model's training step as one autograd node.

The ops composed through autograd record a node (and run checks and dispatch) per op and
per loss term: a dozen for a regularized autoencoder's step, as many for a VAE's. That host
time is most of a step at small and mid-sized batches on a GPU. Here a step's forward runs
the ops' bodies in a row and its backward chains the ops' own backward bodies, summing
each gradient's contributions in the order autograd does: the same numbers, bit for bit,
as the ops composed (``tests/test_one_node_step.py``). Under ``create_graph`` the backward
recomputes the step through the ops, whose double-backward formulas autograd records.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from . import _checks, ops, reference
from .noise import Noise, check_seed

# A training step with gradients runs as one autograd node where it can; False composes the
# ops through autograd (to hook a step's intermediate outputs; tests compare the two).
ONE_NODE_STEP = True


def available(x: Tensor, params: tuple[Tensor | None, ...]) -> bool:
    """Whether a step on ``x`` with ``params`` can run as one node: plain eager with
    gradients (see ``ops._plain_eager``), some parameter requiring a gradient, x requiring
    none and made outside inference mode, no autocast, no torch.func transform."""
    device = x.device.type
    return (
        ONE_NODE_STEP
        and torch.is_grad_enabled()
        and not x.requires_grad
        and any(p is not None and p.requires_grad for p in params)
        and not (_checks.autocast_available(device) and torch.is_autocast_enabled(device))
        and ops._plain_eager((x, *params))
        and not ops._under_torch_func((x, *params))
        and not x.is_inference()  # the node saves x, which an inference tensor cannot be
    )


def check_bce_input(model: torch.nn.Module, x: Tensor) -> None:
    """A BCE model's inputs are its targets: x must lie in [0, 1] where the model checks."""
    if model.loss_name == "bce" and model.check_targets:
        ops._check_target(x, "x", ops.MODEL_BCE_ADVICE)


# the noise parameters of a layer that corrupts nothing (kind, level, low, high, seed)
_NO_NOISE = ("none", 0.0, 0.0, 0.0, ops._NO_NOISE_SEED)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """a + b, where None is zero (an output the loss left out)."""
    if a is None:
        return b
    return a if b is None else a + b


def _for_inputs(ctx, grads: tuple) -> tuple:
    """``grads`` with None for each input that needs no gradient (autograd refuses a gradient
    for an input that is None, such as a layer without a bias)."""
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=True))


def _recorded_grads(outputs: tuple, grads: tuple, params: tuple) -> list[Tensor | None]:
    """The gradients of ``params`` from ``outputs`` recomputed through the ops, whose backward
    formulas autograd records (second and higher derivatives), for the output gradients
    ``grads`` (None: unused); None for a parameter that is None or needs no gradient."""
    used = [(out, g) for out, g in zip(outputs, grads, strict=True) if g is not None]
    wanted = [i for i, p in enumerate(params) if p is not None and p.requires_grad]
    found = torch.autograd.grad(
        [out for out, _ in used], [params[i] for i in wanted], [g for _, g in used],
        create_graph=True, allow_unused=True,
    )  # fmt: skip
    param_grads = [None] * len(params)
    for i, grad in zip(wanted, found, strict=True):
        param_grads[i] = grad
    return param_grads


# ----------------------------------------------------------------------------- autoencoder


def _autoencoder_outputs(encode, decode_loss, bernoulli_kl, x, weight, bias, decoder_weight,
                         decoder_bias, target, enc, dec, terms):  # fmt: skip
    """A module's step from ``encode``, ``decode_loss`` and ``bernoulli_kl`` (the ops' bodies,
    or their callers, which autograd records): the outputs (reconstruction_loss, per_sample,
    h, jac, sparsity, contractive, loss), an empty tensor for each that is absent (without a
    penalty the loss is the reconstruction loss itself), then what backward needs: stats,
    d loss / d z^ and d KL / d rho_hat."""
    output, loss_name, dec_name = dec
    kl, l1_weight, contractive = terms
    h, rho_hat, jac, stats = encode(x, weight, bias, *enc)
    matrix = weight.t() if decoder_weight is None else decoder_weight
    per_sample, grad_zhat, _ = decode_loss(
        h, matrix, decoder_bias, target, output, loss_name, dec_name, False, True
    )
    reconstruction = per_sample.mean()
    contractive_term, total = rho_hat.new_empty(0), rho_hat.new_empty(0)
    # the terms as the module writes them: weight * penalty, summed in this order
    sparsity, kl_grad = _sparsity_term(bernoulli_kl, rho_hat, kl, l1_weight)
    if kl is not None or l1_weight is not None or contractive:
        total = reconstruction
        if kl is not None or l1_weight is not None:
            total = total + sparsity
        if contractive:
            contractive_term = contractive * jac
            total = total + contractive_term
    outputs = (reconstruction, per_sample, h, jac, sparsity, contractive_term, total)
    return outputs, stats, grad_zhat, kl_grad


def _loss_terms_backward(g_loss, g_rec, g_per_sample, g_sparsity, kl, l1_weight, kl_grad, code):
    """(d / d per_sample, d / d rho_hat or None) of loss = reconstruction + sparsity (+ the
    contractive term), reconstruction = per_sample.mean(), sparsity = kl[1] * KL(rho_hat) or
    l1_weight * rho_hat.sum(): autograd's rules for add, mean, a scalar product and sum, term
    by term, from the gradients of those outputs (None: unused) and the codes (B, H)."""
    g_rec = _add(g_loss, g_rec)
    g_sparsity = _add(g_loss, g_sparsity)
    if g_rec is not None:
        g_per_sample = _add(g_rec.expand(code.shape[0]) / code.shape[0], g_per_sample)
    grad_rho = None
    if g_sparsity is not None and kl is not None:
        grad_rho = ((g_sparsity * kl[1]) * kl_grad).to(kl_grad.dtype)
    elif g_sparsity is not None and l1_weight is not None:
        grad_rho = (g_sparsity * l1_weight).expand(code.shape[1])
    return g_per_sample, grad_rho


def _sparsity_term(bernoulli_kl, rho_hat: Tensor, kl, l1_weight) -> tuple[Tensor, Tensor]:
    """(sparsity term, d KL / d rho_hat) as the module writes the term, weight * penalty; an
    empty tensor for each that is absent."""
    sparsity, kl_grad = rho_hat.new_empty(0), rho_hat.new_empty(0)
    if kl is not None:
        kl_value, kl_grad = bernoulli_kl(rho_hat, kl[0], kl[2])
        sparsity = kl[1] * kl_value
    elif l1_weight is not None:
        sparsity = l1_weight * rho_hat.sum()  # mean_i |h_ij| = rho_hat_j for h >= 0
    return sparsity, kl_grad


# The ops' backward bodies, called from the steps' backward: directly in plain eager, else
# (a backward traced by compiled autograd) through the op, which dynamo does not trace into
# (the bodies' numpy Philox would stop it).
def _encode_backward(*args):
    return ops._backward_call(ops._encode_backward_op, ops._encode_backward_body, *args)


def _decode_backward(*args):
    return ops._backward_call(ops._decode_backward_op, ops._decode_backward_body, *args)


def _reparameterize_backward(*args):
    return ops._backward_call(
        ops._reparameterize_backward_op, ops._reparameterize_backward_body, *args
    )


def _layers_backward(grad, below, weights, saved, needs_input, activation, enc_name,
                     first=_NO_NOISE, grad_rho=None):  # fmt: skip
    """Backward through a chain of encode layers (no statistics but the top's), top to bottom,
    with the ops' own backward body: ``grad`` d/d the top layer's h (None: zero), ``below``
    the bottom layer's input, ``weights`` the layers' W, ``saved`` their (h, stats) in a row,
    ``needs_input[i]`` whether layer i's input needs its gradient (``needs_input[-1]``: the
    top's output, the chain runs only where it does), ``first`` the bottom layer's noise,
    ``grad_rho`` d/d the top layer's rho_hat. Returns ([dW, db of each layer, None where not
    reached], d/d ``below`` or None)."""
    grads = [None] * (2 * len(weights))
    for i in reversed(range(len(weights))):
        if not needs_input[i + 1]:
            return grads, None
        h, stats = saved[2 * i : 2 * i + 2]
        grad = torch.zeros_like(h) if grad is None else grad.contiguous()
        grads[2 * i], grads[2 * i + 1], *grad_input = _encode_backward(
            grad, grad_rho if i == len(weights) - 1 else None, None,
            saved[2 * i - 2] if i else below, weights[i], h, stats, activation,
            *(first if i == 0 else _NO_NOISE), enc_name, needs_input[i],
        )  # fmt: skip
        grad = grad_input[0] if needs_input[i] else None
    return grads, grad


class _AutoencoderStep(torch.autograd.Function):
    """One autoencoder's forward (encode, decode_loss, penalties, total loss) as one autograd
    node whose backward chains the ops' own backward bodies: the same numbers as the ops
    composed through autograd, without a node, checks and dispatch per op and per loss term.

    forward(x~, W, b, V or None (tied: W^T), c, target, encode_params, decode_params, terms)
    returns :func:`_autoencoder_outputs`'s outputs."""

    @staticmethod
    def forward(ctx, x, weight, bias, decoder_weight, decoder_bias, target, enc, dec, terms):
        outputs, stats, grad_zhat, kl_grad = _autoencoder_outputs(
            ops._encode_body, ops._decode_loss_body, ops._bernoulli_kl_body,
            x, weight, bias, decoder_weight, decoder_bias, target, enc, dec, terms,
        )  # fmt: skip
        ctx.enc, ctx.dec, ctx.terms = enc, dec, terms
        ctx.save_for_backward(
            x, weight, bias, decoder_weight, decoder_bias, target, outputs[2], stats, grad_zhat,
            kl_grad,
        )  # fmt: skip
        ctx.set_materialize_grads(False)  # no zero-filled gradients for unused outputs
        if not any(ctx.needs_input_grad[1:3]):
            # the encoder is frozen: h, jac and the penalties depend on nothing trainable and,
            # as from the ops composed, require no gradient
            ctx.mark_non_differentiable(*outputs[2:6])
        return outputs

    @staticmethod
    def backward(ctx, g_rec, g_per_sample, g_h, g_jac, g_sparsity, g_contractive, g_loss):
        if torch.is_grad_enabled():
            return _autoencoder_backward_recorded(
                ctx, (g_rec, g_per_sample, g_h, g_jac, g_sparsity, g_contractive, g_loss)
            )
        x, weight, _, decoder_weight, _, _, h, stats, grad_zhat, kl_grad = ctx.saved_tensors
        activation, kind, level, low, high, seed, enc_name, statistics = ctx.enc
        output, loss_name, dec_name = ctx.dec
        kl, l1_weight, contractive = ctx.terms
        matrix = weight.t() if decoder_weight is None else decoder_weight
        g_per_sample, grad_rho = _loss_terms_backward(
            g_loss, g_rec, g_per_sample, g_sparsity, kl, l1_weight, kl_grad, h
        )
        g_contractive = _add(g_loss, g_contractive)
        if g_contractive is not None and contractive:
            g_jac = _add(g_contractive * contractive, g_jac)
        grad_matrix = grad_decoder_bias = None
        if g_per_sample is not None:
            grad_matrix, grad_decoder_bias, grad_h = _decode_backward(
                g_per_sample, h, matrix, grad_zhat, None, None, output, loss_name, dec_name, True
            )
            g_h = _add(grad_h, g_h)
        if not statistics:
            grad_rho = g_jac = None
        grad_weight = grad_bias = None
        if g_h is not None or grad_rho is not None or g_jac is not None:
            g_h = torch.zeros_like(h) if g_h is None else g_h.contiguous()
            grad_weight, grad_bias = _encode_backward(
                g_h, grad_rho, g_jac, x, weight, h, stats, activation, kind, level, low, high,
                seed, enc_name, False,
            )  # fmt: skip
        if decoder_weight is None and grad_matrix is not None:
            grad_weight = _add(grad_weight, grad_matrix.t())
            grad_matrix = None
        grads = (None, grad_weight, grad_bias, grad_matrix, grad_decoder_bias) + (None,) * 4
        return _for_inputs(ctx, grads)


def _autoencoder_backward_recorded(ctx, grads: tuple) -> tuple:
    """Backward under ``create_graph``: the step recomputed through the ops and
    differentiated (see :func:`_recorded_grads`)."""
    x, weight, bias, decoder_weight, decoder_bias, target = ctx.saved_tensors[:6]
    params = (weight, bias, decoder_weight, decoder_bias)
    outputs = _autoencoder_outputs(
        ops._encode, ops._decode_loss, ops._bernoulli_kl,
        x, *params, target, ctx.enc, ctx.dec, ctx.terms,
    )[0]  # fmt: skip
    return (None, *_recorded_grads(outputs, grads, params)) + (None,) * 4


def _loss_args(x: Tensor, output: str, loss: str, check_target: bool, kl) -> tuple:
    """The checked (output, loss, decode_loss backend) and the KL term's (rho, weight,
    backend) of a step on ``x`` (BCE targets checked if asked)."""
    output = _checks.choice("output", output, reference.OUTPUTS)
    loss = _checks.choice("loss", loss, reference.LOSSES)
    if loss == "bce" and check_target:
        ops._check_target(x, "x", ops.MODEL_BCE_ADVICE)
    dec_name = ops._backend_for("decode_loss", "decoder", x.device)
    if kl is not None:
        kl = (*kl, ops._backend_for("bernoulli_kl", "sparsity", x.device))
    return (output, loss, dec_name), kl


def autoencoder_step(
    x: Tensor, weight: Tensor, bias: Tensor | None, decoder_weight: Tensor | None,
    decoder_bias: Tensor | None, *, activation: str, noise: Noise | None, statistics: bool,
    output: str, loss: str, check_target: bool, kl: tuple[float, float] | None,
    l1_weight: float | None, contractive: float,
) -> tuple[Tensor | None, ...]:  # fmt: skip
    """A module's training step in one autograd node (see :class:`_AutoencoderStep`):
    (loss, reconstruction_loss, per_sample, h, jac, sparsity, contractive), None where
    absent. For plain eager calls with gradients, x requiring none, no autocast; the KL
    term is ``kl[1] * bernoulli_kl(rho_hat, kl[0])``, the L1 term ``l1_weight *
    rho_hat.sum()`` (nonnegative activations), the contractive one ``contractive * jac``."""
    x_enc, weight, bias, activation, kind, level, low, high, seed, enc_name, statistics = (
        ops._encode_args(x, weight, bias, activation, noise, statistics)
    )
    dec, kl = _loss_args(x, output, loss, check_target, kl)
    enc = (activation, kind, level, low, high, seed, enc_name, statistics)
    outs = _AutoencoderStep.apply(
        x_enc, weight, bias, decoder_weight, decoder_bias, x, enc, dec,
        (kl, l1_weight, contractive),
    )  # fmt: skip
    reconstruction, per_sample, h, jac, sparsity, contractive_term, total = outs
    has_penalty = kl is not None or l1_weight is not None or bool(contractive)
    return (
        total if has_penalty else reconstruction, reconstruction, per_sample, h,
        jac if statistics else None,
        sparsity if kl is not None or l1_weight is not None else None,
        contractive_term if contractive else None,
    )  # fmt: skip


# ----------------------------------------------------------------------------- deep


def _layer_pairs(params: tuple) -> list[tuple[Tensor, Tensor]]:
    return [params[i : i + 2] for i in range(0, len(params), 2)]


def _decoder_matrices(pairs: list) -> list[Tensor]:
    """Each decoder layer's weight (from the code outward): V_k, or W_k^T where tied (None)."""
    depth = len(pairs) // 2
    return [
        pairs[depth - 1 - j][0].t() if matrix is None else matrix
        for j, (matrix, _) in enumerate(pairs[depth:])
    ]


def _deep_outputs(encode, decode_loss, bernoulli_kl, x, target, params, enc, dec, terms):
    """A deep autoencoder's step from ``encode``, ``decode_loss`` and ``bernoulli_kl`` (the
    ops' bodies, or their callers, which autograd records), as ``DeepAutoencoder.forward``
    composes the ops: the outputs (reconstruction_loss, per_sample, code, sparsity, loss),
    an empty tensor for each that is absent, then what backward needs: each hidden layer's
    h and stats (encoder, then decoder), d loss / d z^ and d KL / d rho_hat.

    params: (W_1, b_1, ..., W_L, b_L, V_L, c_L, ..., V_1, c_1): the encoder's layers, then
    the decoder's from the code outward (V_1, c_1 the output layer; V_k None: tied, W_k^T).
    The first layer takes the noise, the last encoder layer's statistics give the sparsity
    term."""
    activation, first, enc_name, statistics = enc
    output, loss_name, dec_name = dec
    kl, l1_weight = terms
    pairs = _layer_pairs(params)
    depth = len(pairs) // 2
    h, saved = x, []
    for k, (weight, bias) in enumerate(pairs[:depth]):
        noise = first if k == 0 else _NO_NOISE
        h, rho_hat, _, stats = encode(
            h, weight, bias, activation, *noise, enc_name, statistics and k == depth - 1
        )
        saved += [h, stats]
    code = h
    matrices = _decoder_matrices(pairs)
    for matrix, (_, bias) in zip(matrices[:-1], pairs[depth:-1], strict=True):
        h, _, _, stats = encode(h, matrix, bias, activation, *_NO_NOISE, enc_name, False)
        saved += [h, stats]
    per_sample, grad_zhat, _ = decode_loss(
        h, matrices[-1], pairs[-1][1], target, output, loss_name, dec_name, False, True
    )
    reconstruction = per_sample.mean()
    sparsity, kl_grad = _sparsity_term(bernoulli_kl, rho_hat, kl, l1_weight)
    total = reconstruction + sparsity if statistics else rho_hat.new_empty(0)
    return (reconstruction, per_sample, code, sparsity, total), saved, grad_zhat, kl_grad


class _DeepAutoencoderStep(torch.autograd.Function):
    """A deep autoencoder's forward (encoder layers, decoder layers, decode_loss, sparsity,
    total loss) as one autograd node whose backward chains the ops' own backward bodies.

    forward(x~, target, *params, encode_params, decode_params, terms) returns
    :func:`_deep_outputs`'s outputs; a tied layer's decoder weight is None, its gradient
    added to the encoder weight's."""

    @staticmethod
    def forward(ctx, x, target, *args):
        params, (enc, dec, terms) = args[:-3], args[-3:]
        outputs, saved, grad_zhat, kl_grad = _deep_outputs(
            ops._encode_body, ops._decode_loss_body, ops._bernoulli_kl_body,
            x, target, params, enc, dec, terms,
        )  # fmt: skip
        ctx.enc, ctx.dec, ctx.terms, ctx.n_params = enc, dec, terms, len(params)
        ctx.save_for_backward(x, target, *params, *saved, grad_zhat, kl_grad)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for unused outputs
        if not any(ctx.needs_input_grad[2 : 2 + len(params) // 2]):
            # the encoder is frozen: the code and the sparsity term depend on nothing
            # trainable and, as from the ops composed, require no gradient
            ctx.mark_non_differentiable(outputs[2], outputs[3])
        return outputs

    @staticmethod
    def backward(ctx, g_rec, g_per_sample, g_code, g_sparsity, g_loss):
        if torch.is_grad_enabled():
            grads = (g_rec, g_per_sample, g_code, g_sparsity, g_loss)
            x, target, *rest = ctx.saved_tensors
            params = rest[: ctx.n_params]
            outputs = _deep_outputs(
                ops._encode, ops._decode_loss, ops._bernoulli_kl,
                x, target, params, ctx.enc, ctx.dec, ctx.terms,
            )[0]  # fmt: skip
            return (None, None, *_recorded_grads(outputs, grads, params)) + (None,) * 3
        x, _, *rest = ctx.saved_tensors
        params, saved = rest[: ctx.n_params], rest[ctx.n_params : -2]
        grad_zhat, kl_grad = rest[-2:]
        activation, first, enc_name, statistics = ctx.enc
        kl, l1_weight = ctx.terms
        pairs = _layer_pairs(params)
        depth = len(pairs) // 2
        code = saved[2 * depth - 2]
        g_per_sample, grad_rho = _loss_terms_backward(
            g_loss, g_rec, g_per_sample, g_sparsity, kl, l1_weight, kl_grad, code
        )
        needs = ctx.needs_input_grad[2 : 2 + ctx.n_params]
        encoder_needs, decoder_needs = needs[: 2 * depth], needs[2 * depth :]
        matrices = _decoder_matrices(pairs)
        # the input of decoder layer j (the code, or layer j - 1's h) needs its gradient for
        # the encoder (tied decoder weights among it) or for the decoder layers below j; that
        # of encoder layer k for the encoder layers below k
        decoder_input = [any(encoder_needs) or any(decoder_needs[: 2 * j]) for j in range(depth)]
        encoder_input = [any(encoder_needs[: 2 * k]) for k in range(depth + 1)]
        grads, grad_code = [None] * (2 * 2 * depth), None
        if g_per_sample is not None:
            hidden = saved[2 * depth :]  # the decoder's hidden layers' (h, stats)
            top = hidden[-2] if depth > 1 else code
            grads[-2], grads[-1], *grad_top = _decode_backward(
                g_per_sample, top, matrices[-1], grad_zhat, None, None, *ctx.dec,
                decoder_input[-1],
            )  # fmt: skip
            grads[2 * depth : -2], grad_code = _layers_backward(
                grad_top[0] if grad_top else None, code, matrices[:-1], hidden, decoder_input,
                activation, enc_name,
            )  # fmt: skip
        grad_h = _add(grad_code, g_code)
        if not statistics:
            grad_rho = None
        if encoder_input[depth] and (grad_h is not None or grad_rho is not None):
            weights = [weight for weight, _ in pairs[:depth]]
            grads[: 2 * depth], _ = _layers_backward(
                grad_h, x, weights, saved, encoder_input, activation, enc_name, first, grad_rho
            )
        for j in range(depth):  # a tied W_k serves encoder layer k and, as W_k^T, the decoder
            k, i = depth - 1 - j, 2 * (depth + j)
            if pairs[depth + j][0] is None and grads[i] is not None:
                grads[2 * k] = _add(grads[2 * k], grads[i].t())
                grads[i] = None
        return _for_inputs(ctx, (None, None, *grads) + (None,) * 3)


def deep_autoencoder_step(
    x: Tensor, encoder: list[tuple[Tensor, Tensor]], decoder: list[tuple[Tensor, Tensor]], *,
    activation: str, noise: Noise | None, output: str, loss: str, check_target: bool,
    kl: tuple[float, float] | None, l1_weight: float | None,
) -> tuple[Tensor | None, ...]:  # fmt: skip
    """A deep autoencoder's training step in one autograd node (see
    :class:`_DeepAutoencoderStep`): (loss, reconstruction_loss, per_sample, code, sparsity),
    sparsity None without a sparsity term. ``encoder``: the (W, b) of each layer; ``decoder``:
    the (V, c) of each decoder layer from the code outward, the output layer last (V None:
    tied, W^T of the mirrored encoder layer). For the calls :func:`available` admits; the
    penalties as in :func:`autoencoder_step`, on the code."""
    statistics = kl is not None or l1_weight is not None
    (weight, bias), depth = encoder[0], len(encoder)
    x_enc, weight, bias, activation, kind, level, low, high, seed, enc_name, _ = ops._encode_args(
        x, weight, bias, activation, noise, statistics and depth == 1
    )
    dec, kl = _loss_args(x, output, loss, check_target, kl)
    params = [weight, bias] + [p for pair in (*encoder[1:], *decoder) for p in pair]
    enc = (activation, (kind, level, low, high, seed), enc_name, statistics)
    reconstruction, per_sample, code, sparsity, total = _DeepAutoencoderStep.apply(
        x_enc, x, *params, enc, dec, (kl, l1_weight)
    )
    return (
        total if statistics else reconstruction, reconstruction, per_sample, code,
        sparsity if statistics else None,
    )  # fmt: skip


# ----------------------------------------------------------------------------- VAE


def _split_vae_params(params: tuple) -> tuple[list, tuple, list, tuple]:
    """(encoder layers [(W, b)], posterior (Wq, bq), decoder layers [(W2, b2)], output (V, c))
    of a VAE's flat parameters: L encoder layers, the posterior layer, L decoder hidden
    layers (from z outward), the output layer."""
    depth = (len(params) - 4) // 4
    pairs = _layer_pairs(params)
    return pairs[:depth], pairs[depth], pairs[depth + 1 : 2 * depth + 1], pairs[-1]


def _vae_outputs(encode, reparameterize, decode_loss, x, params, enc, rep, dec, beta):
    """A VAE's step from ``encode``, ``reparameterize`` and ``decode_loss`` (the ops' bodies,
    or their callers, which autograd records), as ``fastae.VAE.forward`` composes the ops:
    the outputs (loss, elbo, reconstruction, kl, per_sample, mu, logvar, z), then what
    backward needs: each encoder layer's h and stats, the posterior [mu, logvar], each decoder
    hidden layer's h and stats, d ell / d z^."""
    encoder, (posterior_weight, posterior_bias), decoder, (decoder_weight, decoder_bias) = (
        _split_vae_params(params)
    )
    activation, enc_name = enc
    layer = (activation, *_NO_NOISE, enc_name, False)  # clean input, no statistics
    h, encoder_saved = x, []
    for weight, bias in encoder:
        h, _, _, stats = encode(h, weight, bias, *layer)
        encoder_saved += [h, stats]
    posterior = F.linear(h, posterior_weight, posterior_bias)
    latent = posterior.shape[1] // 2
    mu, logvar = posterior[:, :latent], posterior[:, latent:]
    z, kl = reparameterize(mu, logvar, *rep)
    h2, decoder_saved = z, []
    for weight, bias in decoder:
        h2, _, _, stats = encode(h2, weight, bias, *layer)
        decoder_saved += [h2, stats]
    reconstruction, grad_zhat, _ = decode_loss(
        h2, decoder_weight, decoder_bias, x, *dec, False, True
    )
    per_sample = reconstruction + kl
    loss = (reconstruction + beta * kl).mean()
    outputs = (loss, -per_sample, reconstruction, kl, per_sample, mu, logvar, z)
    return outputs, (*encoder_saved, posterior, *decoder_saved, grad_zhat)


class _VAEStep(torch.autograd.Function):
    """A VAE's forward (encoder layers, posterior layer, reparameterize, decoder layers, loss)
    as one autograd node whose backward chains the ops' own backward bodies and the
    posterior layer's products as autograd forms them.

    forward(x, *params, encode_params, reparameterize_params, decode_params, beta) returns
    :func:`_vae_outputs`'s outputs; params: (W_1, b_1, ..., W_L, b_L, Wq, bq, W2_1, b2_1,
    ..., W2_L, b2_L, V, c) (see :func:`_split_vae_params`)."""

    @staticmethod
    def forward(ctx, x, *args):
        params, (enc, rep, dec, beta) = args[:-4], args[-4:]
        outputs, saved = _vae_outputs(
            ops._encode_body, ops._reparameterize_body, ops._decode_loss_body,
            x, params, enc, rep, dec, beta,
        )  # fmt: skip
        ctx.enc, ctx.rep, ctx.dec, ctx.beta = enc, rep, dec, beta
        ctx.n_params = len(params)
        ctx.save_for_backward(x, *params, *saved, outputs[-1])
        ctx.set_materialize_grads(False)  # no zero-filled gradients for unused outputs
        if not any(ctx.needs_input_grad[1 : len(params) // 2 + 1]):
            # the encoder and posterior layer are frozen: kl, mu, logvar and z depend on
            # nothing trainable and, as from the ops composed, require no gradient
            ctx.mark_non_differentiable(outputs[3], *outputs[5:])
        return outputs

    @staticmethod
    def backward(ctx, g_loss, g_elbo, g_rec, g_kl, g_per_sample, g_mu, g_logvar, g_z):
        if torch.is_grad_enabled():
            grads = (g_loss, g_elbo, g_rec, g_kl, g_per_sample, g_mu, g_logvar, g_z)
            return _vae_backward_recorded(ctx, grads)
        x, *rest = ctx.saved_tensors
        params, saved = rest[: ctx.n_params], rest[ctx.n_params :]
        encoder, (posterior_weight, _), decoder, (decoder_weight, _) = _split_vae_params(params)
        depth = len(encoder)
        encoder_saved, posterior = saved[: 2 * depth], saved[2 * depth]
        decoder_saved, (grad_zhat, z) = saved[2 * depth + 1 : 4 * depth + 1], saved[-2:]
        needs = ctx.needs_input_grad[1 : 1 + ctx.n_params]
        # mu, logvar and z depend on the encoder and posterior layer; the input of decoder
        # layer i (z, or layer i - 1's h) needs its gradient for them or for layers below i
        needs_mu = any(needs[: 2 * depth + 2])
        decoder_needs = needs[2 * depth + 2 : 4 * depth + 2]
        needs_input = [needs_mu or any(decoder_needs[: 2 * i]) for i in range(depth + 1)]
        activation, enc_name = ctx.enc
        batch, latent = x.shape[0], posterior.shape[1] // 2
        # per_sample = rec + kl, elbo = -per_sample, loss = mean(rec + beta kl): autograd's
        # rules for add, neg, mean and a scalar product, summed in the order autograd sums
        g_per_sample = _add(g_per_sample, None if g_elbo is None else -g_elbo)
        g_mean = None if g_loss is None else g_loss.expand(batch) / batch
        g_rec = _add(_add(g_rec, g_mean), g_per_sample)
        g_kl = _add(_add(g_kl, None if g_mean is None else g_mean * ctx.beta), g_per_sample)
        decoder_grads, output_grads = [None] * (2 * depth), [None, None]
        if g_rec is not None:
            output_grads[0], output_grads[1], *grad_h2 = _decode_backward(
                g_rec, decoder_saved[-2], decoder_weight, grad_zhat, None, None, *ctx.dec,
                needs_input[depth],
            )  # fmt: skip
            decoder_grads, grad_z = _layers_backward(
                grad_h2[0] if grad_h2 else None, z, [weight for weight, _ in decoder],
                decoder_saved, needs_input, activation, enc_name,
            )  # fmt: skip
            g_z = _add(g_z, grad_z)
        mu, logvar = posterior[:, :latent], posterior[:, latent:]
        if needs_mu and (g_z is not None or g_kl is not None):
            grad_mu, grad_logvar = _reparameterize_backward(g_z, g_kl, mu, logvar, *ctx.rep)
            g_mu, g_logvar = _add(g_mu, grad_mu), _add(g_logvar, grad_logvar)
        posterior_grads = [None, None]
        encoder_grads = [None] * (2 * depth)
        if needs_mu and (g_mu is not None or g_logvar is not None):
            # posterior = F.linear(h, Wq, bq) = addmm(bq, h, Wq^T): its backward products as
            # autograd forms them (for the column-major Wq^T it computes dWq^T as (g^T h)^T)
            g_mu = torch.zeros_like(mu) if g_mu is None else g_mu
            g_logvar = torch.zeros_like(logvar) if g_logvar is None else g_logvar
            g_posterior = torch.cat([g_mu, g_logvar], 1)
            h = encoder_saved[-2]
            posterior_grads[0] = g_posterior.t().mm(h) if needs[2 * depth] else None
            posterior_grads[1] = g_posterior.sum(0) if needs[2 * depth + 1] else None
            # the input of encoder layer i needs its gradient for layers below i
            needed = [any(needs[: 2 * i]) for i in range(depth + 1)]
            if needed[depth]:
                encoder_grads, _ = _layers_backward(
                    g_posterior.mm(posterior_weight), x, [weight for weight, _ in encoder],
                    encoder_saved, needed, activation, enc_name,
                )  # fmt: skip
        grads = encoder_grads + posterior_grads + decoder_grads + output_grads
        return _for_inputs(ctx, (None, *grads) + (None,) * 4)


def _vae_backward_recorded(ctx, grads: tuple) -> tuple:
    """Backward under ``create_graph``: the step recomputed through the ops and
    differentiated (see :func:`_recorded_grads`)."""
    x, *params = ctx.saved_tensors[: 1 + ctx.n_params]
    outputs = _vae_outputs(
        ops._encode, ops._reparameterize, ops._decode_loss,
        x, params, ctx.enc, ctx.rep, ctx.dec, ctx.beta,
    )[0]  # fmt: skip
    return (None, *_recorded_grads(outputs, grads, params)) + (None,) * 4


def vae_step(
    x: Tensor, params: tuple[Tensor, ...], *, activation: str, output: str, loss: str,
    check_target: bool, beta: float, seed: int | None,
) -> tuple[Tensor, ...]:  # fmt: skip
    """A VAE's training step in one autograd node (see :class:`_VAEStep`): (loss, elbo,
    reconstruction, kl, per_sample, mu, logvar, z) as ``fastae.VAE.forward`` returns them
    in training mode. params: (W_1, b_1, ..., W_L, b_L, Wq, bq, W2_1, b2_1, ..., W2_L, b2_L,
    V, c) of the encoder's L hidden layers, the posterior layer, the decoder's L hidden layers
    (from z outward) and its output layer."""
    x = ops._check_input(x)
    if loss == "bce" and check_target:
        ops._check_target(x, "x", ops.MODEL_BCE_ADVICE)
    enc_name = ops._backend_for("encode", "encoder", x.device)
    rep_name = ops._backend_for("reparameterize", "vae", x.device)
    dec_name = ops._backend_for("decode_loss", "decoder", x.device)
    seed = ops._seed_tensor(check_seed(seed), rep_name, x.device)
    return _VAEStep.apply(
        x, *params, (activation, enc_name), (seed, rep_name), (output, loss, dec_name), beta
    )
