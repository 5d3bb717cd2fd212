//! Field types that cannot hold invalid values, and the rules that parse them.

use std::collections::BTreeSet;

use uuid::Uuid;

/// Bounds of every short text field of SPEC §2, counted in Unicode scalar values.
pub const SHORT_TEXT_MIN: usize = 3;
pub const SHORT_TEXT_MAX: usize = 20;
/// Bound of a course description.
pub const DESCRIPTION_MAX: usize = 200;
/// A student is enrolled in at most this many courses.
pub const MAX_COURSES_PER_STUDENT: usize = 15;
/// A course has at most this many students.
pub const MAX_STUDENTS_PER_COURSE: usize = 60;

/// One rejected input field, named as the client sent it (`course_ids[2]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidField {
    pub field: String,
    pub reason: String,
}

impl InvalidField {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        InvalidField {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A trimmed text of `SHORT_TEXT_MIN..=max` characters without control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundedText(String);

impl BoundedText {
    /// Parses the raw value of `field` (3..=20 characters); `None` means the client left
    /// the field out.
    pub fn parse(field: &str, raw: Option<&str>) -> Result<Self, InvalidField> {
        Self::parse_up_to(field, raw, SHORT_TEXT_MAX)
    }

    /// Like [`BoundedText::parse`] with another upper bound.
    pub fn parse_up_to(field: &str, raw: Option<&str>, max: usize) -> Result<Self, InvalidField> {
        parse_text(field, raw, SHORT_TEXT_MIN, max).map(BoundedText)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

fn parse_text(
    field: &str,
    raw: Option<&str>,
    min: usize,
    max: usize,
) -> Result<String, InvalidField> {
    let raw = raw.ok_or_else(|| InvalidField::new(field, "is required"))?;
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(InvalidField::new(field, "must not be blank"));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(InvalidField::new(
            field,
            "must not contain control characters",
        ));
    }
    let length = trimmed.chars().count();
    if length < min {
        return Err(InvalidField::new(
            field,
            format!("must be at least {min} characters (got {length})"),
        ));
    }
    if length > max {
        return Err(InvalidField::new(
            field,
            format!("must be at most {max} characters (got {length})"),
        ));
    }
    Ok(trimmed.to_owned())
}

/// Parses a list of related ids: each a UUID, no duplicates, at most `max`. Reports every
/// bad entry, by index.
pub fn parse_id_set(
    field: &str,
    raw: &[String],
    max: usize,
) -> Result<BTreeSet<Uuid>, Vec<InvalidField>> {
    let mut errors = Vec::new();
    if raw.len() > max {
        errors.push(InvalidField::new(
            field,
            format!("must hold at most {max} ids (got {})", raw.len()),
        ));
    }
    let mut ids = BTreeSet::new();
    for (index, text) in raw.iter().enumerate() {
        match Uuid::parse_str(text.trim()) {
            Ok(id) if !ids.insert(id) => {
                errors.push(InvalidField::new(
                    format!("{field}[{index}]"),
                    "is a duplicate",
                ));
            }
            Ok(_) => {}
            Err(_) => errors.push(InvalidField::new(
                format!("{field}[{index}]"),
                "is not a UUID",
            )),
        }
    }
    if errors.is_empty() {
        Ok(ids)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_may_have_up_to_200_characters() {
        let ok = "d".repeat(DESCRIPTION_MAX);
        assert!(BoundedText::parse_up_to("description", Some(&ok), DESCRIPTION_MAX).is_ok());
        let long = "d".repeat(DESCRIPTION_MAX + 1);
        assert!(BoundedText::parse_up_to("description", Some(&long), DESCRIPTION_MAX).is_err());
    }

    fn name(raw: &str) -> Result<BoundedText, InvalidField> {
        BoundedText::parse("name", Some(raw))
    }

    #[test]
    fn names_of_3_and_20_characters_are_accepted() {
        assert_eq!(name("abc").expect("3 chars").as_str(), "abc");
        assert_eq!(
            name(&"x".repeat(20)).expect("20 chars").as_str(),
            "x".repeat(20)
        );
    }

    #[test]
    fn names_of_2_and_21_characters_are_refused_with_the_count() {
        assert_eq!(
            name("ab").expect_err("2 chars").reason,
            "must be at least 3 characters (got 2)"
        );
        assert_eq!(
            name(&"x".repeat(21)).expect_err("21 chars").reason,
            "must be at most 20 characters (got 21)"
        );
    }

    #[test]
    fn length_counts_unicode_scalar_values_not_bytes() {
        // 20 characters, 40+ bytes.
        let accented = "é".repeat(20);
        assert_eq!(name(&accented).expect("20 scalars").as_str(), accented);
        assert!(name(&"é".repeat(21)).is_err());
        // Three CJK characters are three characters.
        assert_eq!(name("数学者").expect("3 scalars").as_str(), "数学者");
        assert!(name("数学").is_err());
    }

    #[test]
    fn surrounding_whitespace_is_trimmed_before_counting() {
        assert_eq!(name("  Ada  ").expect("trimmed").as_str(), "Ada");
        assert!(name("  ab  ").is_err());
        assert_eq!(
            name(&format!(" {} ", "x".repeat(20)))
                .expect("trimmed")
                .as_str()
                .len(),
            20
        );
    }

    #[test]
    fn blank_missing_and_control_characters_are_refused() {
        assert_eq!(name("    ").expect_err("blank").reason, "must not be blank");
        assert_eq!(name("").expect_err("empty").reason, "must not be blank");
        assert_eq!(
            BoundedText::parse("first_name", None).expect_err("missing"),
            InvalidField::new("first_name", "is required")
        );
        assert!(name("Ada\u{0}Lovelace").is_err());
        assert!(name("Ada\nLovelace").is_err());
    }

    #[test]
    fn id_sets_report_every_bad_entry_by_index() {
        let a = Uuid::now_v7().to_string();
        let errors =
            parse_id_set("course_ids", &[a.clone(), "nope".into(), a], 15).expect_err("bad");
        assert_eq!(
            errors,
            vec![
                InvalidField::new("course_ids[1]", "is not a UUID"),
                InvalidField::new("course_ids[2]", "is a duplicate"),
            ]
        );
    }

    #[test]
    fn id_sets_are_bounded() {
        let ids: Vec<String> = (0..16).map(|_| Uuid::now_v7().to_string()).collect();
        assert_eq!(
            parse_id_set("course_ids", &ids[..15], 15)
                .expect("15 ok")
                .len(),
            15
        );
        assert_eq!(
            parse_id_set("course_ids", &ids, 15).expect_err("16")[0].reason,
            "must hold at most 15 ids (got 16)"
        );
    }
}
