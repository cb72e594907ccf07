// exp(x) for fp32 vectors, Cephes' expf: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6
// polynomial, times 2^n built in the exponent bits. Relative error ~1e-7 down to the subnormal results
// (x >= -103.97, as std::exp gives them); below, exactly 0. Shared by the AVX2 and AVX-512 vectors.
// The subnormal range matters: a softmax weight of e^-95 times a V of +Inf is +Inf, but 0 * Inf is NaN.
// x86 min/max return their *second* operand when either is NaN: the constant goes first so that a
// NaN input stays NaN (as std::exp and torch.exp give) instead of becoming exp(88) and taking all the
// softmax weight.
#pragma once

namespace qwen_fused {
namespace {

template <class V>
inline typename V::reg exp_cephes(typename V::reg x) {
  x = V::max(V::set1(-103.972084f), V::min(V::set1(88.3762626647949f), x));
  const auto n = V::floor(V::fmadd(x, V::set1(1.44269504088896341f), V::set1(0.5f)));
  x = V::fmadd(n, V::set1(-0.693359375f), x);
  x = V::fmadd(n, V::set1(2.12194440e-4f), x);
  auto y = V::set1(1.9875691500e-4f);
  y = V::fmadd(y, x, V::set1(1.3981999507e-3f));
  y = V::fmadd(y, x, V::set1(8.3334519073e-3f));
  y = V::fmadd(y, x, V::set1(4.1665795894e-2f));
  y = V::fmadd(y, x, V::set1(1.6666665459e-1f));
  y = V::fmadd(y, x, V::set1(5.0000001201e-1f));
  y = V::fmadd(y, V::mul(x, x), V::add(x, V::set1(1.f)));
  // 2^n for n in [-150, 128] as two powers of two: one normal fp32 holds 2^-126 at the least.
  const auto normal_n = V::max(n, V::set1(-126.f));
  return V::mul(V::mul(y, V::pow2(normal_n)), V::pow2(V::sub(n, normal_n)));
}

}  // namespace
}  // namespace qwen_fused
