//! Rewards for reinforcement learning on verifiable answers (GRPO): a [`Reward`] scores a
//! completion against the reference answer of its prompt. Built in: [`MathAnswer`] (1 when
//! the completion's final answer equals the reference after normalisation, else 0) and
//! [`Format`] (1 when the completion states a final answer in a recognised form).
//!
//! The final answer is the content of the last `\boxed{…}` (braces balanced), else what
//! follows the last `answer:` (any case) on its line. Answers compare as numbers when both
//! parse as one — integers, decimals, thousands separators, fractions `a/b`,
//! `\frac{a}{b}`, percentages, mixed signs — and otherwise as text after normalisation
//! (spaces, `$`, `\left`/`\right`, `\text{…}`, `\dfrac`, a trailing period removed).

/// Scores one completion of a prompt against the prompt's reference answer.
pub trait Reward: Send + Sync {
    /// Name for logs and metrics.
    fn name(&self) -> &'static str;
    /// The reward (typically in [0, 1]).
    fn score(&self, completion: &str, reference: &str) -> f64;
}

/// 1 when the completion's final answer equals the reference, else 0.
#[derive(Debug, Clone, Copy, Default)]
pub struct MathAnswer;

impl Reward for MathAnswer {
    fn name(&self) -> &'static str {
        "math_answer"
    }

    fn score(&self, completion: &str, reference: &str) -> f64 {
        match final_answer(completion) {
            Some(answer) if answers_equal(&answer, reference) => 1.0,
            _ => 0.0,
        }
    }
}

/// 1 when the completion states a final answer (`\boxed{…}` or an `answer:` line), else 0.
#[derive(Debug, Clone, Copy, Default)]
pub struct Format;

impl Reward for Format {
    fn name(&self) -> &'static str {
        "format"
    }

    fn score(&self, completion: &str, _reference: &str) -> f64 {
        f64::from(u8::from(final_answer(completion).is_some_and(|a| !a.trim().is_empty())))
    }
}

/// A weighted sum of rewards.
pub struct Weighted(pub Vec<(f64, Box<dyn Reward>)>);

impl Reward for Weighted {
    fn name(&self) -> &'static str {
        "weighted"
    }

    fn score(&self, completion: &str, reference: &str) -> f64 {
        self.0.iter().map(|(w, r)| w * r.score(completion, reference)).sum()
    }
}

/// The final answer stated in `text`: the last `\boxed{…}`, else the last `answer:` line.
pub fn final_answer(text: &str) -> Option<String> {
    if let Some(boxed) = last_boxed(text) {
        return Some(boxed);
    }
    // ASCII lowering keeps byte offsets (full Unicode lowering may not).
    let lower = text.to_ascii_lowercase();
    let at = lower.rfind("answer")?;
    let decoration = |c: char| c == ' ' || c == '*';
    let rest = text[at + "answer".len()..].trim_start_matches(decoration);
    let rest = rest.strip_prefix(':').or_else(|| rest.strip_prefix("is"))?.trim_start_matches(decoration);
    Some(rest.lines().next().unwrap_or("").trim().trim_end_matches('*').trim().to_string())
}

/// Content of the last `\boxed{…}` (or `\fbox{…}`), braces balanced.
fn last_boxed(text: &str) -> Option<String> {
    let start = ["\\boxed{", "\\fbox{"].iter().filter_map(|m| text.rfind(m).map(|i| i + m.len())).max()?;
    let mut depth = 1;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(text[start..start + i].to_string());
                }
            }
            _ => {}
        }
    }
    None
}

/// Whether two answers are the same: as numbers when both parse, else as normalised text.
pub fn answers_equal(a: &str, b: &str) -> bool {
    let (a, b) = (normalise(a), normalise(b));
    match (number(&a), number(&b)) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
        _ => !a.is_empty() && a == b,
    }
}

/// Drops what does not change an answer's meaning.
fn normalise(s: &str) -> String {
    let mut s = s.trim().to_string();
    // `\text{cm}` → `cm`; `\dfrac`/`\tfrac` → `\frac`; sizing and spacing commands go.
    while let Some(i) = s.find("\\text{") {
        let Some(end) = s[i..].find('}') else { break };
        s = format!("{}{}{}", &s[..i], &s[i + 6..i + end], &s[i + end + 1..]);
    }
    for (from, to) in [
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("$", ""),
        (" ", ""),
        ("^\\circ", ""),
        ("^{\\circ}", ""),
    ] {
        s = s.replace(from, to);
    }
    let s = s.trim_end_matches('.').to_string();
    // A lone assignment `x=5` answers with its value.
    match s.split_once('=') {
        Some((lhs, rhs)) if lhs.chars().all(|c| c.is_ascii_alphabetic()) && !lhs.is_empty() => rhs.to_string(),
        _ => s,
    }
}

/// The value of a numeric answer: `12`, `-3.5`, `1,000`, `3/4`, `\frac{3}{4}`, `-\frac34`,
/// `50\%`.
fn number(s: &str) -> Option<f64> {
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (s, scale) = match s.strip_suffix("\\%").or_else(|| s.strip_suffix('%')) {
        Some(rest) => (rest, 0.01),
        None => (s, 1.0),
    };
    let plain = |t: &str| -> Option<f64> {
        // Commas only as thousands separators: `1,000` is a number, `1,2` is a list.
        let whole = t.split('.').next().unwrap_or("");
        let mut groups = whole.split(',');
        let grouped = whole.contains(',')
            && groups.next().is_some_and(|g| (1..=3).contains(&g.len()))
            && groups.all(|g| g.len() == 3);
        if whole.contains(',') && !grouped {
            return None;
        }
        let t = t.replace(',', "");
        if t.is_empty() || !t.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return None;
        }
        t.parse::<f64>().ok()
    };
    let value = if let Some(rest) = s.strip_prefix("\\frac") {
        let (num, den) = if let Some(r) = rest.strip_prefix('{') {
            let (num, r) = r.split_once('}')?;
            let den = r.strip_prefix('{')?.strip_suffix('}')?;
            (num.to_string(), den.to_string())
        } else {
            // `\frac34`: single digits.
            let mut chars = rest.chars();
            let (n, d) = (chars.next()?, chars.next()?);
            if chars.next().is_some() {
                return None;
            }
            (n.to_string(), d.to_string())
        };
        plain(&num)? / plain(&den)?
    } else if let Some((num, den)) = s.split_once('/') {
        plain(num)? / plain(den)?
    } else {
        plain(s)?
    };
    value.is_finite().then_some(if neg { -value } else { value } * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_answers_are_found() {
        assert_eq!(final_answer("so \\boxed{\\frac{1}{2}} and \\boxed{7}").as_deref(), Some("7"));
        assert_eq!(final_answer("\\boxed{\\frac{a}{\\sqrt{2}}}").as_deref(), Some("\\frac{a}{\\sqrt{2}}"));
        assert_eq!(final_answer("Thinking...\nAnswer: 42\nThanks").as_deref(), Some("42"));
        assert_eq!(final_answer("The answer is 12.").as_deref(), Some("12."));
        assert_eq!(final_answer("**Answer:** -3"), Some("-3".into()));
        assert_eq!(final_answer("no conclusion"), None);
        assert_eq!(final_answer("\\boxed{unclosed"), None);
    }

    #[test]
    fn tricky_answers_compare_correctly() {
        let r = MathAnswer;
        for (completion, reference) in [
            ("\\boxed{1,000}", "1000"),
            ("\\boxed{0.5}", "\\frac{1}{2}"),
            ("\\boxed{\\dfrac{3}{4}}", "3/4"),
            ("\\boxed{-\\frac34}", "-0.75"),
            ("answer: $12$.", "12"),
            ("\\boxed{x = 5}", "5"),
            ("\\boxed{50\\%}", "0.5"),
            ("\\boxed{10\\text{ cm}}", "10cm"),
            ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)"),
            ("\\boxed{90^\\circ}", "90"),
            ("\\boxed{2.50}", "2.5"),
            ("\\boxed{12,345.5}", "12345.5"),
            ("ΩΩ K answer: 7", "7"),
        ] {
            assert_eq!(r.score(completion, reference), 1.0, "{completion} vs {reference}");
        }
        for (completion, reference) in [
            ("\\boxed{3}", "4"),
            ("\\boxed{-2}", "2"),
            ("\\boxed{1/3}", "0.33"),
            ("answer: ", "0"),
            ("the result is 5", "5"),
            ("\\boxed{}", ""),
            ("\\boxed{1,2}", "12"),
            ("İİİ answer: 5", "6"),
        ] {
            assert_eq!(r.score(completion, reference), 0.0, "{completion} vs {reference}");
        }
    }

    #[test]
    fn format_and_weighted_rewards() {
        assert_eq!(Format.score("\\boxed{3}", "x"), 1.0);
        assert_eq!(Format.score("answer: 3", "x"), 1.0);
        assert_eq!(Format.score("3", "x"), 0.0);
        let both = Weighted(vec![(1.0, Box::new(MathAnswer)), (0.1, Box::new(Format))]);
        assert!((both.score("\\boxed{3}", "3") - 1.1).abs() < 1e-12);
        assert!((both.score("\\boxed{4}", "3") - 0.1).abs() < 1e-12);
    }
}
