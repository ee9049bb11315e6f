// ftplan calibration kernel: C = A x B with inputs of type `Elem`, accumulated in f32, with more
// work per thread than matmul.wgsl: a 16 x 16 workgroup computes a 128 x 128 tile of C, each
// thread an 8 x 8 block in 64 registers, stepping through K in slices of 8 staged in workgroup
// memory. Needs n to be a multiple of 128. The including code defines `Elem`.

// Bindings and `Dims`: kernels_common.wgsl.

const TILE: u32 = 128u;
const BK: u32 = 8u;
var<workgroup> a_scalar: array<f32, 1024>; // [k][m]: 8 x 128 (A transposed)
var<workgroup> b_tile: array<vec4<f32>, 256>; // [k][n/4]: 8 x 32 vec4

@compute @workgroup_size(16, 16)
fn matmul(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let n = dims.n;
    let n4 = n / 4u;
    let row0 = wid.y * TILE;
    let col0 = wid.x * TILE;
    let tid = lid.y * 16u + lid.x;
    // A loads: each thread reads one vec4 along k of one row (128 rows x 2 quads).
    let a_row = tid / 2u;
    let a_quad = tid % 2u;
    // B loads: row k = tid / 32, column quad tid % 32.
    let b_k = tid / 32u;
    let b_quad = tid % 32u;
    var acc: array<vec4<f32>, 16>;
    for (var i = 0u; i < 16u; i = i + 1u) {
        acc[i] = vec4<f32>(0.0);
    }
    for (var k0 = 0u; k0 < n; k0 = k0 + BK) {
        let av = vec4<f32>(a[(row0 + a_row) * n4 + k0 / 4u + a_quad]);
        // Wait until every thread is done with the previous slice before overwriting it.
        workgroupBarrier();
        b_tile[b_k * 32u + b_quad] = vec4<f32>(b[(k0 + b_k) * n4 + col0 / 4u + b_quad]);
        a_scalar[(a_quad * 4u) * TILE + a_row] = av.x;
        a_scalar[(a_quad * 4u + 1u) * TILE + a_row] = av.y;
        a_scalar[(a_quad * 4u + 2u) * TILE + a_row] = av.z;
        a_scalar[(a_quad * 4u + 3u) * TILE + a_row] = av.w;
        workgroupBarrier();
        for (var k = 0u; k < BK; k = k + 1u) {
            let base = k * TILE + lid.y * 8u;
            let a0 = vec4<f32>(a_scalar[base], a_scalar[base + 1u], a_scalar[base + 2u], a_scalar[base + 3u]);
            let a1 = vec4<f32>(a_scalar[base + 4u], a_scalar[base + 5u], a_scalar[base + 6u], a_scalar[base + 7u]);
            let b0 = b_tile[k * 32u + lid.x * 2u];
            let b1 = b_tile[k * 32u + lid.x * 2u + 1u];
            acc[0] = acc[0] + a0.x * b0;
            acc[1] = acc[1] + a0.x * b1;
            acc[2] = acc[2] + a0.y * b0;
            acc[3] = acc[3] + a0.y * b1;
            acc[4] = acc[4] + a0.z * b0;
            acc[5] = acc[5] + a0.z * b1;
            acc[6] = acc[6] + a0.w * b0;
            acc[7] = acc[7] + a0.w * b1;
            acc[8] = acc[8] + a1.x * b0;
            acc[9] = acc[9] + a1.x * b1;
            acc[10] = acc[10] + a1.y * b0;
            acc[11] = acc[11] + a1.y * b1;
            acc[12] = acc[12] + a1.z * b0;
            acc[13] = acc[13] + a1.z * b1;
            acc[14] = acc[14] + a1.w * b0;
            acc[15] = acc[15] + a1.w * b1;
        }
    }
    let r = row0 + lid.y * 8u;
    let cq = col0 / 4u + lid.x * 2u;
    for (var i = 0u; i < 8u; i = i + 1u) {
        c[(r + i) * n4 + cq] = acc[2u * i];
        c[(r + i) * n4 + cq + 1u] = acc[2u * i + 1u];
    }
}
