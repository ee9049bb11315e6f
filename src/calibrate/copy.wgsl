// ftplan calibration kernel: a bandwidth copy.

struct Dims {
    n: u32,
    words: u32,
    groups: u32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> c: array<vec4<f32>>;
@group(0) @binding(3) var<uniform> dims: Dims;

// c = a, vec4 at a time, grid-stride over `words` vec4s.
@compute @workgroup_size(256)
fn copy(@builtin(global_invocation_id) gid: vec3<u32>) {
    let stride = dims.groups * 256u;
    for (var i = gid.x; i < dims.words; i = i + stride) {
        c[i] = a[i];
    }
}
