// row_ops.inc's two builds: rows8 (V = Lanes8, AVX2) and rows16 (V = Lanes16, AVX-512, its
// functions QK_AVX512). Every function there is inline or a template, so each file that
// includes this one may instantiate what it needs.
#pragma once

#include <algorithm>
#include <cmath>

#include "kernels.h"

namespace rows8 {
using V = qk::Lanes8;
#define QK_ROWS
#include "row_ops.inc"
#undef QK_ROWS
}  // namespace rows8

namespace rows16 {
using V = qk::Lanes16;
#define QK_ROWS QK_AVX512
#include "row_ops.inc"
#undef QK_ROWS
}  // namespace rows16
