//! What `pcibus nvme perf` prints, as spdk_nvme_perf and fio report a run: IOPS and MiB/s,
//! latency min, mean, max, standard deviation and p50/p90/p99/p99.9/p99.99, a line per
//! queue when there are several, and the latency histogram as CSV (`--histogram FILE`).

use std::io::Write;

use serde_json::{Map, Value, json};

use pcibus::nvme::perf::{Histogram, PerfResult};

use super::Error;

/// The percentiles reported: (quantile, text label, JSON key).
const PERCENTILES: [(f64, &str, &str); 5] = [
    (0.5, "p50", "p50_us"),
    (0.9, "p90", "p90_us"),
    (0.99, "p99", "p99_us"),
    (0.999, "p99.9", "p99_9_us"),
    (0.9999, "p99.99", "p99_99_us"),
];

/// How the run was set up, for the report.
pub(super) struct RunInfo<'a> {
    /// The pattern, as given to `--rw`.
    pub rw: &'a str,
    pub bs: usize,
    pub qd: u16,
    pub queues: u16,
    /// Percentage of reads of a mixed run.
    pub rwmixread: Option<u8>,
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn mib_s(ios: u64, secs: f64, bs: usize) -> f64 {
    ios as f64 / secs.max(1e-9) * bs as f64 / (1u64 << 20) as f64
}

// The latency figures under the JSON names, in microseconds.
fn latency_json(h: &Histogram, all: bool) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("min_us".into(), json!(us(h.min_ns())));
    m.insert("mean_us".into(), json!(h.mean_ns() / 1000.0));
    if all {
        m.insert("stdev_us".into(), json!(h.stdev_ns() / 1000.0));
        for (q, _, key) in PERCENTILES {
            m.insert(key.into(), json!(us(h.quantile_ns(q))));
        }
    } else {
        m.insert("p99_us".into(), json!(us(h.quantile_ns(0.99))));
    }
    m.insert("max_us".into(), json!(us(h.max_ns())));
    m
}

/// The summary as one JSON object (the flat keys scripts read with `sed`/`jq`). With
/// several queues, `per_queue` (one object per queue) comes before the totals, so that a
/// script taking the last `"iops":` still gets the total.
pub(super) fn perf_json(run: &RunInfo, r: &PerfResult) -> Map<String, Value> {
    let secs = r.elapsed.as_secs_f64();
    let done = (r.ios + r.errors).max(1) as f64;
    let mut v = Map::new();
    v.insert("rw".into(), json!(run.rw));
    v.insert("bs".into(), json!(run.bs));
    v.insert("qd".into(), json!(run.qd));
    v.insert("queues".into(), json!(run.queues));
    if let Some(p) = run.rwmixread {
        v.insert("rwmixread".into(), json!(p));
    }
    if r.per_queue.len() > 1 {
        let queues: Vec<Value> = r
            .per_queue
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let mut m = Map::new();
                m.insert("queue".into(), json!(i));
                m.insert("ios".into(), json!(q.ios));
                m.insert("errors".into(), json!(q.errors));
                m.insert("iops".into(), json!(q.ios as f64 / secs.max(1e-9)));
                m.insert("mib_s".into(), json!(mib_s(q.ios, secs, run.bs)));
                m.extend(latency_json(&q.latency, false));
                Value::Object(m)
            })
            .collect();
        v.insert("per_queue".into(), Value::Array(queues));
    }
    v.insert("seconds".into(), json!(secs));
    v.insert("ios".into(), json!(r.ios));
    v.insert("reads".into(), json!(r.reads));
    v.insert("writes".into(), json!(r.writes));
    v.insert("errors".into(), json!(r.errors));
    v.insert("iops".into(), json!(r.iops()));
    v.insert("mib_s".into(), json!(mib_s(r.ios, secs, run.bs)));
    v.extend(latency_json(&r.latency, true));
    v.insert("doorbells_per_io".into(), json!(r.doorbells as f64 / done));
    v.insert("cpu_ns_per_io".into(), json!(r.cpu.as_nanos() as f64 / done));
    v.insert("first_error".into(), json!(r.first_error));
    v
}

/// The summary as text: the run and its throughput; a line per queue when there are
/// several; latency (min, avg, max, stdev, then the percentiles) in microseconds; counts
/// and costs.
pub(super) fn write_perf_text(out: &mut impl Write, run: &RunInfo, r: &PerfResult) -> Result<(), Error> {
    let secs = r.elapsed.as_secs_f64();
    let mix = run.rwmixread.map_or(String::new(), |p| format!(" ({p}% reads)"));
    writeln!(
        out,
        "{}{mix} bs {} qd {} x {} queue(s), {secs:.1} s: {:.0} IOPS, {:.1} MiB/s",
        run.rw,
        run.bs,
        run.qd,
        run.queues,
        r.iops(),
        mib_s(r.ios, secs, run.bs)
    )?;
    if r.per_queue.len() > 1 {
        for (i, q) in r.per_queue.iter().enumerate() {
            writeln!(
                out,
                "  queue {i}: {:.0} IOPS, {:.1} MiB/s, latency us min {:.1} avg {:.1} p99 {:.1} max {:.1}, {} errors",
                q.ios as f64 / secs.max(1e-9),
                mib_s(q.ios, secs, run.bs),
                us(q.latency.min_ns()),
                q.latency.mean_ns() / 1000.0,
                us(q.latency.quantile_ns(0.99)),
                us(q.latency.max_ns()),
                q.errors
            )?;
        }
    }
    let h = &r.latency;
    writeln!(
        out,
        "latency us: min {:.1}  avg {:.1}  max {:.1}  stdev {:.1}",
        us(h.min_ns()),
        h.mean_ns() / 1000.0,
        us(h.max_ns()),
        h.stdev_ns() / 1000.0
    )?;
    let percentiles: Vec<String> = PERCENTILES
        .iter()
        .map(|(q, label, _)| format!("{label} {:.1}", us(h.quantile_ns(*q))))
        .collect();
    writeln!(out, "percentiles us: {}", percentiles.join("  "))?;
    let done = (r.ios + r.errors).max(1) as f64;
    writeln!(
        out,
        "{} I/Os ({} reads, {} writes), {} errors, {:.2} SQ doorbells per I/O, {:.0} ns CPU per I/O",
        r.ios,
        r.reads,
        r.writes,
        r.errors,
        r.doorbells as f64 / done,
        r.cpu.as_nanos() as f64 / done
    )?;
    if let Some(e) = &r.first_error {
        writeln!(out, "first error: {e}")?;
    }
    Ok(())
}

/// The latency histogram as CSV: a header `low_ns,high_ns,count`, then one row per
/// non-empty bucket, smallest latencies first; a bucket holds the latencies from `low_ns`
/// to `high_ns` nanoseconds, both included (each value below 128 ns has its own bucket,
/// above that each power of two is cut into 128).
pub(super) fn write_histogram_csv(out: &mut impl Write, h: &Histogram) -> std::io::Result<()> {
    writeln!(out, "low_ns,high_ns,count")?;
    for b in h.buckets() {
        writeln!(out, "{},{},{}", b.low_ns, b.high_ns, b.count)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn result() -> PerfResult {
        let mut queues = Vec::new();
        for q in 0..2u64 {
            let mut r = PerfResult::default();
            for i in 1..=1000u64 {
                r.latency.record(i * 1000 * (q + 1));
            }
            r.ios = 1000;
            r.reads = 700;
            r.writes = 300;
            queues.push(r);
        }
        let mut total = PerfResult {
            elapsed: Duration::from_secs(2),
            ..PerfResult::default()
        };
        for q in &queues {
            total.merge(q.clone());
        }
        total.per_queue = queues;
        total
    }

    fn info() -> RunInfo<'static> {
        RunInfo {
            rw: "randrw",
            bs: 4096,
            qd: 8,
            queues: 2,
            rwmixread: Some(70),
        }
    }

    #[test]
    fn json_has_the_fio_figures_and_the_queues_before_the_totals() {
        let v = perf_json(&info(), &result());
        assert_eq!(v["ios"], 2000);
        assert_eq!(
            (v["reads"].clone(), v["writes"].clone()),
            (json!(1400), json!(600))
        );
        assert_eq!(v["iops"], 1000.0);
        assert_eq!(v["rwmixread"], 70);
        assert_eq!(v["min_us"], 1.0);
        assert_eq!(v["max_us"], 2000.0);
        for key in [
            "mean_us",
            "stdev_us",
            "p50_us",
            "p90_us",
            "p99_us",
            "p99_9_us",
            "p99_99_us",
        ] {
            assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}");
        }
        // The 1980th of 2000: the 21st largest of the second queue's 2, 4, ... 2000 µs.
        let p99 = v["p99_us"].as_f64().unwrap();
        assert!((p99 / 1960.0 - 1.0).abs() < 0.004, "{p99}");
        let queues = v["per_queue"].as_array().unwrap();
        assert_eq!(queues.len(), 2);
        assert_eq!(queues[1]["max_us"], 2000.0);
        assert_eq!(queues[0]["iops"], 500.0);
        // The totals come after the queues (scripts take the last "iops").
        let text = Value::Object(v).to_string();
        let last = text.rfind("\"iops\":").unwrap();
        assert!(text[last..].starts_with("\"iops\":1000"), "{text}");
    }

    #[test]
    fn text_has_a_line_per_queue_and_the_percentiles() {
        let mut out = Vec::new();
        write_perf_text(&mut out, &info(), &result()).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("randrw (70% reads) bs 4096 qd 8 x 2 queue(s), 2.0 s: 1000 IOPS"),
            "{text}"
        );
        assert!(text.contains("\n  queue 0: 500 IOPS"), "{text}");
        assert!(text.contains("\n  queue 1: 500 IOPS"), "{text}");
        assert!(text.contains("latency us: min 1.0  avg "), "{text}");
        assert!(text.contains("percentiles us: p50 "), "{text}");
        assert!(text.contains("p99.9 ") && text.contains("p99.99 "), "{text}");
        assert!(
            text.contains("2000 I/Os (1400 reads, 600 writes), 0 errors"),
            "{text}"
        );
        // One queue: no queue lines.
        let mut one = result();
        one.per_queue.truncate(1);
        let mut out = Vec::new();
        write_perf_text(&mut out, &info(), &one).unwrap();
        assert!(!String::from_utf8(out).unwrap().contains("queue 0:"));
    }

    #[test]
    fn histogram_csv_rows_cover_every_latency() {
        let mut h = Histogram::default();
        for ns in [5u64, 5, 200, 201, 1_000_000] {
            h.record(ns);
        }
        let mut out = Vec::new();
        write_histogram_csv(&mut out, &h).unwrap();
        let text = String::from_utf8(out).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("low_ns,high_ns,count"));
        let rows: Vec<(u64, u64, u64)> = lines
            .map(|l| {
                let f: Vec<u64> = l.split(',').map(|x| x.parse().unwrap()).collect();
                (f[0], f[1], f[2])
            })
            .collect();
        assert_eq!(rows[0], (5, 5, 2));
        assert_eq!(rows.iter().map(|r| r.2).sum::<u64>(), 5);
        assert!(rows.windows(2).all(|w| w[0].1 < w[1].0));
        for ns in [200u64, 201, 1_000_000] {
            assert!(rows.iter().any(|&(lo, hi, _)| lo <= ns && ns <= hi), "{ns}");
        }
    }
}
