//! The JSON contracts of every command that prints results, and the error messages, pinned by
//! snapshots (insta): a renamed or removed field, or a reworded error, fails here first.
//! Field names are a contract: add, don't rename.

use crate::ftplan;
use serde_json::Value;

fn json(args: &[&str], code: i32) -> Value {
    let out = ftplan().args(args).assert().code(code);
    serde_json::from_slice(&out.get_output().stdout)
        .unwrap_or_else(|e| panic!("{args:?} is not JSON ({e})"))
}

/// The shape of a JSON value: object keys and value kinds, arrays by the shapes of all their
/// elements merged (a field that is an integer in one element and null in another is
/// "integer | null"), so the contract does not depend on which element sorts first.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(shape).reduce(merge).into_iter().collect()),
        Value::Number(n) if n.is_u64() => "integer".into(),
        Value::Number(_) => "number".into(),
        Value::String(_) => "string".into(),
        Value::Bool(_) => "bool".into(),
        Value::Null => "null".into(),
    }
}

/// Two elements' shapes as one: objects key by key (a key some elements lack is kept), arrays
/// by their element shapes, kinds as their sorted union.
fn merge(a: Value, b: Value) -> Value {
    match (a, b) {
        (Value::Object(mut x), Value::Object(y)) => {
            for (k, v) in y {
                let merged = match x.remove(&k) {
                    Some(u) => merge(u, v),
                    None => v,
                };
                x.insert(k, merged);
            }
            Value::Object(x)
        }
        (Value::Array(x), Value::Array(y)) => {
            Value::Array(x.into_iter().chain(y).reduce(merge).into_iter().collect())
        }
        (Value::String(x), Value::String(y)) => {
            let mut kinds: Vec<&str> = x.split(" | ").chain(y.split(" | ")).collect();
            kinds.sort_unstable();
            kinds.dedup();
            kinds.join(" | ").into()
        }
        (x, y) => panic!("an element's shape is {x} in one place and {y} in another"),
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).expect("JSON")
}

#[test]
fn estimate_json_contract() {
    let v = json(
        &[
            "estimate",
            "--model",
            "llama2-7b",
            "--gpu",
            "a100",
            "--method",
            "lora",
            "--gpus",
            "8",
            "--engine",
            "fsdp",
            "--format",
            "json",
        ],
        0,
    );
    insta::assert_snapshot!("estimate_json_shape", pretty(&shape(&v)));
}

#[test]
fn list_check_fit_json_contracts() {
    let v = json(&["list", "gpus", "--format", "json"], 0);
    insta::assert_snapshot!("list_gpus_json_shape", pretty(&shape(&v)));
    let v = json(&["list", "models", "--format", "json"], 0);
    insta::assert_snapshot!("list_models_json_shape", pretty(&shape(&v)));
    let v = json(
        &[
            "check",
            "examples/llama2-7b-lora-a100.toml",
            "--format",
            "json",
        ],
        0,
    );
    insta::assert_snapshot!("check_json_shape", pretty(&shape(&v)));
    let v = json(
        &[
            "fit",
            "--model",
            "llama2-13b",
            "--gpu",
            "a100",
            "--max-gpus",
            "8",
            "--layouts",
            "2",
            "--format",
            "json",
        ],
        1,
    );
    insta::assert_snapshot!("fit_json_shape", pretty(&shape(&v)));
}

#[test]
fn compare_sweep_validate_json_contracts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().display().to_string();
    let v = json(
        &[
            "compare",
            "--model",
            "gpt2",
            "--gpu",
            "h100",
            "--methods",
            "full,lora",
            "--format",
            "json",
            "--out",
            &out,
        ],
        0,
    );
    insta::assert_snapshot!("compare_json_shape", pretty(&shape(&v)));
    let v = json(
        &[
            "sweep",
            "--over",
            "batch",
            "--model",
            "gpt2",
            "--gpu",
            "h100",
            "--methods",
            "full",
            "--format",
            "json",
            "--out",
            &out,
        ],
        0,
    );
    insta::assert_snapshot!("sweep_json_shape", pretty(&shape(&v)));
    let v = json(
        &[
            "sweep",
            "--over",
            "gpus",
            "--gpu",
            "a100",
            "--methods",
            "lora",
            "--models",
            "gpt2",
            "--format",
            "json",
            "--out",
            &out,
        ],
        0,
    );
    insta::assert_snapshot!("sweep_gpus_json_shape", pretty(&shape(&v)));
    let v = json(&["validate", "--format", "json"], 0);
    insta::assert_snapshot!(
        "validate_json_summary",
        pretty(
            &serde_json::json!({ "summary": shape(&v["summary"]), "within_bounds": v["within_bounds"], "row": shape(&v["rows"][0]).get("name").cloned() })
        )
    );
}

#[test]
fn error_messages() {
    let mut all = String::new();
    for args in [
        &["estimate", "--model", "llama2-7", "--gpu", "a100"][..],
        &[
            "estimate", "--model", "gpt2", "--gpu", "h100", "--seq", "4096",
        ],
        &[
            "estimate", "--model", "gpt2", "--gpu", "h100", "--gpus", "6", "--tp", "4",
        ],
        &[
            "estimate",
            "--model",
            "gpt2",
            "--gpu",
            "h100",
            "--gpus",
            "8",
            "--offload",
            "optimizer",
        ],
        &[
            "estimate", "--model", "gpt2", "--gpu", "h100", "--price", "nan",
        ],
        &["estimate", "--model", "gpt2", "--gpu", "h100", "--bogus"],
        &[
            "estimate",
            "--model",
            "tests/fixtures/invalid/inf-size.toml",
            "--gpu",
            "h100",
        ],
        &["check", "tests/fixtures"],
    ] {
        let out = ftplan().args(args).assert().code(2);
        let err = crate::stderr_of(&out);
        let err: Vec<&str> = err.lines().filter(|l| !l.starts_with("note: ")).collect();
        all += &format!("$ ftplan {}\n{}\n\n", args.join(" "), err.join("\n"));
    }
    insta::assert_snapshot!("error_messages", all);
}
