// The softmax part of scaled dot-product attention's double backward, CPU, in
// place (nio_fast/ops/attention.py states the algebra). Per row of S scores,
// with P the probabilities, dP the gradient of P, H the cotangent of the scores'
// gradient (times `scale`) and C the part of P's cotangent that comes from the
// value gradient's cotangent:
//   dS  = P (dP - <P, dP>)                           (the scores' gradient)
//   GdP = P (H - <H, P>)                             (dP's cotangent)
//   GP  = H (dP - <P, dP>) - <H, P> dP + C           (P's cotangent)
//   GS  = P (GP - <GP, P>)                           (the scores' cotangent)
// PyTorch composes these from about a dozen elementwise ops, each a pass over
// (and most a new allocation of) an [R, L, S] tensor; here each row is three
// passes in cache and the results overwrite their inputs: dP -> dS, H -> GdP,
// C -> GS. Rows are independent (at::parallel_for over them).
#pragma once

#include <ATen/ATen.h>

namespace nio_fast {

// probabilities, grad_p, cot_grad_scores, cot_p: contiguous float32/float64 CPU
// tensors of one shape, the last axis the keys. Overwrites grad_p with dS,
// cot_grad_scores (H before `scale`) with GdP and cot_p (C) with GS.
void attention_softmax_double_backward_(const at::Tensor& probabilities, at::Tensor& grad_p,
                                        at::Tensor& cot_grad_scores, at::Tensor& cot_p, double scale);

}  // namespace nio_fast
