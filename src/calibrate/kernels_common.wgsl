// ftplan calibration kernels' shared interface: inputs `a` and `b` of type `Elem` (f32, or f16
// where the adapter has shader-f16; the including code defines it), output `c` in f32, sizes in
// `dims`.

struct Dims {
    n: u32,
    words: u32,
    groups: u32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read> a: array<vec4<Elem>>;
@group(0) @binding(1) var<storage, read> b: array<vec4<Elem>>;
@group(0) @binding(2) var<storage, read_write> c: array<vec4<f32>>;
@group(0) @binding(3) var<uniform> dims: Dims;
