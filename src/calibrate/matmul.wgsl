// ftplan calibration kernel: C = A x B with inputs of type `Elem` (f32, or f16 where the
// adapter has shader-f16), accumulated in f32. The including code defines `Elem`.

// Bindings and `Dims`: kernels_common.wgsl.

// C = A x B for n x n row-major matrices, n a multiple of 64.
// A 16 x 16 workgroup computes a 64 x 64 tile of C; each thread a 4 x 4 block held in registers
// (register blocking), stepping through K in slices of 16 staged in workgroup memory with vec4
// loads from global memory.
const TILE: u32 = 64u;
const BK: u32 = 16u;
var<workgroup> a_tile: array<f32, 1024>; // [k][m]: 16 x 64 scalars (A transposed)
var<workgroup> b_tile: array<vec4<f32>, 256>; // [k][n/4]: 16 x 16 vec4

@compute @workgroup_size(16, 16)
fn matmul(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let n = dims.n;
    let n4 = n / 4u;
    let row0 = wid.y * TILE;
    let col0 = wid.x * TILE;
    let tid = lid.y * 16u + lid.x;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    // This thread's A loads: row (tid / 4) of the tile, k-quad (tid % 4).
    let a_row = tid / 4u;
    let a_quad = tid % 4u;
    // B loads: k row (tid / 16), column quad (tid % 16).
    let b_k = tid / 16u;
    let b_quad = tid % 16u;
    for (var k0 = 0u; k0 < n; k0 = k0 + BK) {
        let av = vec4<f32>(a[(row0 + a_row) * n4 + k0 / 4u + a_quad]);
        // Transpose A into [k][m] so that a thread reads its four rows as one vec4 below.
        a_tile[(a_quad * 4u) * TILE + a_row] = av.x;
        a_tile[(a_quad * 4u + 1u) * TILE + a_row] = av.y;
        a_tile[(a_quad * 4u + 2u) * TILE + a_row] = av.z;
        a_tile[(a_quad * 4u + 3u) * TILE + a_row] = av.w;
        b_tile[b_k * 16u + b_quad] = vec4<f32>(b[(k0 + b_k) * n4 + col0 / 4u + b_quad]);
        workgroupBarrier();
        for (var k = 0u; k < BK; k = k + 1u) {
            let base = k * TILE + lid.y * 4u;
            let am = vec4<f32>(a_tile[base], a_tile[base + 1u], a_tile[base + 2u], a_tile[base + 3u]);
            let bn = b_tile[k * 16u + lid.x];
            acc0 = acc0 + am.x * bn;
            acc1 = acc1 + am.y * bn;
            acc2 = acc2 + am.z * bn;
            acc3 = acc3 + am.w * bn;
        }
        workgroupBarrier();
    }
    let r = row0 + lid.y * 4u;
    let cq = col0 / 4u + lid.x;
    c[r * n4 + cq] = acc0;
    c[(r + 1u) * n4 + cq] = acc1;
    c[(r + 2u) * n4 + cq] = acc2;
    c[(r + 3u) * n4 + cq] = acc3;
}
