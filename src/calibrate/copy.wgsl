// ftplan calibration kernel: a bandwidth copy.

// Bindings and `Dims`: kernels_common.wgsl (with `Elem = f32`; `b` is unused here).

// c = a, vec4 at a time, grid-stride over `words` vec4s.
@compute @workgroup_size(256)
fn copy(@builtin(global_invocation_id) gid: vec3<u32>) {
    let stride = dims.groups * 256u;
    for (var i = gid.x; i < dims.words; i = i + stride) {
        c[i] = a[i];
    }
}
