//! SQL expressions for the fakes that look like what they replace: a first name where a
//! first name was, a phone number in its country's shape. Every one is computed from
//! `keyed`, a keyed hash (32 hex digits) of the original value, so the same input always
//! gives the same fake and nobody without the key can map fakes back by hashing guesses.

/// What part of a name a column holds, from its name (`first_name`, `surname`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamePart {
    First,
    Last,
    Full,
}

impl NamePart {
    /// The part column `column` holds: first for first/given/fore names, last for
    /// last/family/sur names, else the full name.
    pub fn of_column(column: &str) -> NamePart {
        match super::pii::classify(column) {
            Some(super::pii::Kind::FirstName) => NamePart::First,
            Some(super::pii::Kind::LastName) => NamePart::Last,
            _ => NamePart::Full,
        }
    }
}

const FIRST: &[&str] = &[
    "Alex", "Sam", "Robin", "Jordan", "Taylor", "Morgan", "Casey", "Jamie", "Riley", "Avery",
    "Quinn", "Drew", "Kai", "Noa", "Eli", "Mika", "Lena", "Omar", "Ines", "Yuki", "Priya", "Tomas",
    "Amara", "Jonas", "Leila", "Mateo", "Hana", "Felix", "Zara", "Ivan", "Nia", "Arjun",
];
const LAST: &[&str] = &[
    "Smith",
    "Garcia",
    "Müller",
    "Rossi",
    "Novak",
    "Kim",
    "Silva",
    "Dubois",
    "Jensen",
    "Kowalski",
    "Haddad",
    "Sato",
    "Okafor",
    "Larsen",
    "Moreau",
    "Costa",
    "Nguyen",
    "Schmidt",
    "Ivanova",
    "Fischer",
    "Tanaka",
    "Mensah",
    "Lindqvist",
    "Petrov",
    "Ortiz",
    "Byrne",
    "Yilmaz",
    "Andersen",
    "Horvat",
    "Chen",
    "Patel",
    "Walsh",
];

fn pick(list: &[&str], keyed: &str, byte: usize) -> String {
    let items: Vec<String> = list.iter().map(|s| super::literal(s)).collect();
    format!(
        "(ARRAY[{}])[1 + get_byte(decode({keyed}, 'hex'), {byte}) % {}]",
        items.join(","),
        list.len()
    )
}

/// A fake name of `part`.
pub fn name(part: NamePart, keyed: &str) -> String {
    match part {
        NamePart::First => pick(FIRST, keyed, 0),
        NamePart::Last => pick(LAST, keyed, 1),
        NamePart::Full => format!(
            "{} || ' ' || {}",
            pick(FIRST, keyed, 0),
            pick(LAST, keyed, 1)
        ),
    }
}

/// `user_` and 12 hex digits of the keyed hash.
pub fn username(keyed: &str) -> String {
    format!("'user_' || substr({keyed}, 1, 12)")
}

/// Phone shapes: `D` any digit, `N` 2–9 (a digit a number may start with), anything else
/// as written. The E.164 form (`+` country code, national significant number) and how the
/// same number is written at home. Mobile ranges where a country has them, as those are what
/// user tables hold.
const PHONE_SHAPES: &[(&str, &str, &str)] = &[
    ("US", "+1NDDNDDDDDD", "(NDD) NDD-DDDD"),
    ("CA", "+1NDDNDDDDDD", "(NDD) NDD-DDDD"),
    ("GB", "+447NDDDDDDDD", "07NDD DDDDDD"),
    ("IE", "+3538NDDDDDDD", "08N DDD DDDD"),
    ("DE", "+4917DDDDDDDDD", "017D DDDDDDDD"),
    ("AT", "+43664DDDDDDD", "0664 DDDDDDD"),
    ("CH", "+417NDDDDDDD", "07N DDD DD DD"),
    ("FR", "+336DDDDDDDD", "06 DD DD DD DD"),
    ("BE", "+324NDDDDDDD", "04ND DD DD DD"),
    ("NL", "+316DDDDDDDD", "06 DDDDDDDD"),
    ("ES", "+346DDDDDDDD", "6DD DDD DDD"),
    ("PT", "+3519NDDDDDDD", "9ND DDD DDD"),
    ("IT", "+393NDDDDDDDD", "3ND DDD DDDD"),
    ("SE", "+467NDDDDDDD", "07N-DDD DD DD"),
    ("DK", "+45NDDDDDDD", "ND DD DD DD"),
    ("NO", "+474DDDDDDD", "4DD DD DDD"),
    ("FI", "+3584NDDDDDDD", "04N DDD DDDD"),
    ("PL", "+48NDDDDDDDD", "NDD DDD DDD"),
    ("AU", "+614NDDDDDDD", "04ND DDD DDD"),
    ("NZ", "+642NDDDDDDD", "02N DDD DDDD"),
    ("IN", "+919DDDDDDDDD", "09DDDD DDDDD"),
    ("JP", "+8190DDDDDDDD", "090-DDDD-DDDD"),
    ("BR", "+55NN9DDDDDDDD", "(NN) 9DDDD-DDDD"),
    ("MX", "+52NNDDDDDDDD", "NN DDDD DDDD"),
    ("ZA", "+277NDDDDDDD", "07N DDD DDDD"),
];

/// Country codes (ISO 3166-1 alpha-2) with a phone shape, for error messages.
pub fn phone_countries() -> Vec<&'static str> {
    PHONE_SHAPES.iter().map(|(c, _, _)| *c).collect()
}

/// Whether `country` has a phone shape.
pub fn has_phone_shape(country: &str) -> bool {
    PHONE_SHAPES.iter().any(|(c, _, _)| *c == country)
}

/// Without a country: a national number as many countries write one (`0` area code and
/// subscriber number), not a number any country's plan says is invalid.
const NATIONAL_WITHOUT_COUNTRY: &str = "0NDD NDDDDDD";

/// A fake phone number: E.164 for `country` (`+4917612345678`), else a plausible national
/// number. The digits come from the keyed hash: the last 17 decimal digits of its first 60
/// bits (up to 19 digits; the top ones are not uniform) for `D`, one byte each of its last 8
/// for `N`.
pub fn phone(country: Option<&str>, keyed: &str) -> String {
    let shape = match country.and_then(|c| PHONE_SHAPES.iter().find(|(k, _, _)| *k == c)) {
        Some((_, e164, _)) => *e164,
        None => NATIONAL_WITHOUT_COUNTRY,
    };
    let pool = format!(
        "right(lpad((('x' || substr({keyed}, 1, 15))::bit(60)::bigint)::text, 19, '0'), 17)"
    );
    let mut parts: Vec<String> = Vec::new();
    let mut literal = String::new();
    let (mut digit, mut leading) = (0, 0);
    for c in shape.chars() {
        let part = match c {
            'D' => {
                digit += 1;
                format!("substr({pool}, {digit}, 1)")
            }
            'N' => {
                leading += 1;
                format!(
                    "(2 + get_byte(decode({keyed}, 'hex'), {}) % 8)::text",
                    7 + leading
                )
            }
            other => {
                literal.push(other);
                continue;
            }
        };
        if !literal.is_empty() {
            parts.push(super::literal(&std::mem::take(&mut literal)));
        }
        parts.push(part);
    }
    if !literal.is_empty() {
        parts.push(super::literal(&literal));
    }
    debug_assert!(
        digit <= 17 && leading <= 8,
        "shape {shape} needs too many digits"
    );
    parts.join(" || ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_fits_the_digits_the_hash_gives() {
        for (country, e164, national) in PHONE_SHAPES {
            for shape in [e164, national] {
                let d = shape.chars().filter(|c| *c == 'D').count();
                let n = shape.chars().filter(|c| *c == 'N').count();
                assert!(d <= 17 && n <= 8, "{country}: {shape}");
            }
            // E.164: a plus, then at most 15 digits.
            let digits = e164
                .chars()
                .filter(|c| c.is_ascii_digit() || *c == 'D' || *c == 'N');
            assert!(
                e164.starts_with('+') && digits.count() <= 15,
                "{country}: {e164}"
            );
            assert!(e164[1..]
                .chars()
                .all(|c| c.is_ascii_digit() || c == 'D' || c == 'N'));
        }
    }

    #[test]
    fn name_parts_follow_the_column() {
        assert_eq!(NamePart::of_column("first_name"), NamePart::First);
        assert_eq!(NamePart::of_column("givenName"), NamePart::First);
        assert_eq!(NamePart::of_column("fname"), NamePart::First);
        assert_eq!(NamePart::of_column("last_name"), NamePart::Last);
        assert_eq!(NamePart::of_column("surname"), NamePart::Last);
        assert_eq!(NamePart::of_column("full_name"), NamePart::Full);
        assert_eq!(NamePart::of_column("name"), NamePart::Full);
    }
}
