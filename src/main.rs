use ftplan::spec::registry::resolve_hardware;

fn main() {
    let hw = resolve_hardware("h200").expect("h200").value;
    let rates = ftplan::time::Rates::from_datasheet(&hw);
    let text = std::fs::read_to_string("validation/measured.jsonl").expect("read");
    let rows = ftplan::validate::compare("validation/measured.jsonl", &text, &hw, &rates).expect("compare");
    for r in &rows {
        if std::env::var("DBG").is_ok_and(|d| r.name.contains(&d)) {
            let e = ftplan::estimate::estimate(&r.model, &r.plan, &hw, &rates).unwrap();
            let b = e.memory.at_peak; let m = |x: ftplan::units::Bytes| x.0 as f64 / 1048576.0;
            println!("  at {:?} {} w {:.0} g {:.0} o {:.0} a {:.0} l {:.0} t {:.0}", e.memory.peak_phase, e.memory.peak_op, m(b.weights), m(b.gradients), m(b.optimizer), m(b.activations), m(b.logits), m(b.temporary));
        }
        let ms = r.measured_step_s.unwrap_or(0.0); println!("{:55} {:8.0} {:8.0} {:+6.1}%  {:7.1} {:7.1} {:+6.1}%", r.name, r.measured_peak as f64 / 1048576.0, r.estimated_peak as f64 / 1048576.0, r.error * 100.0, ms*1e3, r.estimated_step_s*1e3, (r.estimated_step_s/ms-1.0)*100.0);
    }
    let (m, w) = ftplan::validate::summary(&rows);
    println!("median {:.1}% worst {:.1}%", m * 100.0, w * 100.0);
}
#[allow(dead_code)]
fn _unused() {}
