// SAPA-D (docs/design.md §6): the per-sample math shared by the CPU and CUDA kernels (host and
// device). Layout NHWC; every leading dim of q is the batch n.
//
//   q (n, sH, sW, G*E)   k (n, H, W, G*E)   v (n, H, W, G*Cg)   offsets (n, sH, sW, G*P*2)
//
// Offset channel (g*P + p)*2 + 0 is dx, + 1 is dy, of point p of group g, in low-res pixels
// from the parent pixel (i' / s, j' / s). The bilinear cell and its four corner weights follow
// sapa_jax/deform.py `bilinear_cells` operation for operation, so the kernels see the jnp
// path's weights bit for bit.
#ifndef SAPA_JAX_XLA_FFI_DEFORM_COMMON_H_
#define SAPA_JAX_XLA_FFI_DEFORM_COMMON_H_

#include <cmath>
#include <cstdint>
#include <string>

#include "sapa_common.h"

namespace sapa {

struct DeformGeometry {
  int64_t n, H, W, s, P, G, E, Cg;  // batch, low-res map, scale, points, groups, widths

  SAPA_HD int64_t oH() const { return H * s; }
  SAPA_HD int64_t oW() const { return W * s; }
  SAPA_HD int64_t qk_dim() const { return G * E; }
  SAPA_HD int64_t C() const { return G * Cg; }
  SAPA_HD int64_t off_dim() const { return G * P * 2; }
  SAPA_HD int64_t q_at(int64_t b, int64_t i, int64_t j) const {
    return ((b * oH() + i) * oW() + j) * qk_dim();
  }
  SAPA_HD int64_t out_at(int64_t b, int64_t i, int64_t j) const {
    return ((b * oH() + i) * oW() + j) * C();
  }
  SAPA_HD int64_t off_at(int64_t b, int64_t i, int64_t j) const {
    return ((b * oH() + i) * oW() + j) * off_dim();
  }
  SAPA_HD int64_t pixel(int64_t b, int64_t y, int64_t x) const { return (b * H + y) * W + x; }
};

// What a sample reads: nothing (outside -1 < py < H, -1 < px < W, the boundary included:
// value 0, gradient 0), the bilinear cell, or nothing with NaN weights (a NaN position inside
// the range test: its value and its position gradient are NaN, nothing reaches k or v).
enum SampleKind : int { kSampleOutside = 0, kSampleRead = 1, kSampleNan = 2 };

template <typename A> struct DeformCell {
  int kind;
  int64_t y0, x0;  // top-left corner; corner c is (y0 + c / 2, x0 + c % 2)
  A w[4];          // corner weights (1-ly)(1-lx), (1-ly)lx, ly(1-lx), ly lx
  A ly, lx;        // position inside the cell

  SAPA_HD bool corner_inside(int c, int64_t H, int64_t W) const {
    const int64_t y = y0 + (c >> 1), x = x0 + (c & 1);
    return y >= 0 && y < H && x >= 0 && x < W;
  }
  SAPA_HD int64_t corner_y(int c) const { return y0 + (c >> 1); }
  SAPA_HD int64_t corner_x(int c) const { return x0 + (c & 1); }
  // d w_c / d ly and d w_c / d lx (floor held constant, as jnp's stop_gradient)
  SAPA_HD A dw_dly(int c) const { return (c >> 1) ? ((c & 1) ? lx : A(1) - lx)
                                                  : ((c & 1) ? -lx : -(A(1) - lx)); }
  SAPA_HD A dw_dlx(int c) const { return (c & 1) ? ((c >> 1) ? ly : A(1) - ly)
                                                 : ((c >> 1) ? -ly : -(A(1) - ly)); }
};

template <typename A>
SAPA_HD DeformCell<A> deform_cell(A py, A px, int64_t H, int64_t W) {
  DeformCell<A> cell{};
  // Comparisons with NaN are false: a NaN coordinate with the other one outside is outside.
  const bool outside = py <= A(-1) || py >= A(H) || px <= A(-1) || px >= A(W);
  if (outside) {
    cell.kind = kSampleOutside;
    return cell;
  }
  cell.kind = (py != py || px != px) ? kSampleNan : kSampleRead;
  const A y0 = std::floor(py), x0 = std::floor(px);
  cell.ly = py - y0;
  cell.lx = px - x0;
  const A ly = cell.ly, lx = cell.lx;
  cell.w[0] = (A(1) - ly) * (A(1) - lx);
  cell.w[1] = (A(1) - ly) * lx;
  cell.w[2] = ly * (A(1) - lx);
  cell.w[3] = ly * lx;
  cell.y0 = cell.kind == kSampleRead ? int64_t(y0) : 0;
  cell.x0 = cell.kind == kSampleRead ? int64_t(x0) : 0;
  return cell;
}

// The sample position of point p of group g at output point (i, j): parent + offset.
template <typename A>
SAPA_HD void deform_position(const DeformGeometry& g, int64_t i, int64_t j, A dx, A dy, A* py,
                             A* px) {
  *py = A(i / g.s) + dy;
  *px = A(j / g.s) + dx;
}

// Limits of both back ends: every index product stays far from int64 overflow, and (CUDA) the
// per-block counts fit an int.
constexpr int64_t kDeformMaxPoints = 1 << 16;
constexpr int64_t kDeformMaxGroups = 1 << 16;
constexpr int64_t kDeformMaxScale = 46340;

inline std::string check_deform_attributes(int64_t num_points, int64_t groups, int64_t scale) {
  auto bad = [](const char* name, int64_t got, int64_t limit) {
    return std::string(name) + " must be in 1.." + std::to_string(limit) + ", got " +
           std::to_string(got);
  };
  if (num_points < 1 || num_points > kDeformMaxPoints)
    return bad("num_points", num_points, kDeformMaxPoints);
  if (groups < 1 || groups > kDeformMaxGroups) return bad("groups", groups, kDeformMaxGroups);
  if (scale < 1 || scale > kDeformMaxScale) return bad("scale", scale, kDeformMaxScale);
  return std::string();
}

}  // namespace sapa

#endif  // SAPA_JAX_XLA_FFI_DEFORM_COMMON_H_
