//! One matrix cell's repeats, and the spread (median, min–max) of a
//! figure over them: what the table and the plot both show.

use crate::plan::Case;
use crate::run::RunResult;

/// Median, min, max of a non-empty sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(xs: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut v: Vec<f64> = xs.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    pub fn fmt(&self, digits: usize) -> String {
        if self.min == self.max {
            format!("{:.digits$}", self.median)
        } else {
            format!(
                "{:.digits$} ({:.digits$}–{:.digits$})",
                self.median, self.min, self.max
            )
        }
    }
}

/// The repeats of one matrix cell.
#[derive(Debug, Clone)]
pub struct Cell {
    pub case: Case,
    pub runs: Vec<RunResult>,
    pub failed: usize,
}

impl Cell {
    pub fn spread(&self, f: impl Fn(&RunResult) -> f64) -> Option<Spread> {
        Spread::of(self.runs.iter().map(f))
    }
}

#[cfg(test)]
mod tests {
    use super::Spread;

    #[test]
    fn medians_and_ranges() {
        let s = Spread::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Spread::of([4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(Spread::of([]).is_none());
        assert!(Spread::of([f64::NAN]).is_none());
    }
}
