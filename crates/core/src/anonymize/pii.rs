//! Which column names look like personal data (`pgtwig anonymize --check`), and the masking
//! rule to suggest for each.
//!
//! A name is split into lowercase words at `_`, `-`, spaces, camelCase and letter/digit
//! boundaries (`billingAddress2` → billing, address, 2), and matched on words, not
//! substrings: `username` and `user_name` are user names, `filename` and `rename_at` are
//! nothing.

/// What personal data a column seems to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Email,
    Phone,
    Username,
    FirstName,
    LastName,
    FullName,
    Address,
    Postcode,
    IpAddress,
    DateOfBirth,
    Iban,
    CardNumber,
    NationalId,
}

impl Kind {
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Email => "email address",
            Kind::Phone => "phone number",
            Kind::Username => "user name",
            Kind::FirstName => "first name",
            Kind::LastName => "last name",
            Kind::FullName => "name",
            Kind::Address => "address line",
            Kind::Postcode => "postcode",
            Kind::IpAddress => "IP address",
            Kind::DateOfBirth => "date of birth",
            Kind::Iban => "bank account (IBAN)",
            Kind::CardNumber => "card number",
            Kind::NationalId => "national ID / passport",
        }
    }

    /// A rule for `.pgtwig.toml` that masks column `column` of this kind.
    pub fn suggested_rule(self, column: &str) -> String {
        match self {
            Kind::Email => "\"email\"".into(),
            Kind::Phone => "\"phone\"".into(),
            Kind::Username => "\"username\"".into(),
            Kind::FirstName => "\"first_name\"".into(),
            Kind::LastName => "\"last_name\"".into(),
            Kind::FullName => "\"name\"".into(),
            Kind::Address => "{ constant = \"1 Example Street\" }".into(),
            Kind::Postcode | Kind::IpAddress => "\"null\"".into(),
            Kind::DateOfBirth => format!(
                "{{ sql = \"date_trunc('year', {})::date\" }}",
                super::ident(column).replace('"', "\\\"")
            ),
            Kind::Iban | Kind::CardNumber => "{ keep_first = 4 }".into(),
            Kind::NationalId => "\"hash\"".into(),
        }
    }
}

/// `billingAddress2` → ["billing", "address", "2"].
pub fn words(name: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut prev: Option<char> = None;
    for c in name.chars() {
        let boundary = match prev {
            _ if !c.is_alphanumeric() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                prev = None;
                continue;
            }
            Some(p) => {
                (p.is_lowercase() && c.is_uppercase())
                    || (p.is_alphabetic() && c.is_ascii_digit())
                    || (p.is_ascii_digit() && c.is_alphabetic())
            }
            None => false,
        };
        if boundary && !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
        word.extend(c.to_lowercase());
        prev = Some(c);
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// Words that say a `…_name` column names a person (`contact_name`, `display_name`).
const PERSON: &[&str] = &[
    "full",
    "display",
    "contact",
    "customer",
    "person",
    "real",
    "legal",
    "middle",
    "maiden",
    "patient",
    "employee",
    "billing",
    "shipping",
    "recipient",
    "sender",
    "owner",
    "holder",
    "cardholder",
    "account",
    "member",
    "client",
    "guardian",
    "parent",
    "emergency",
];

/// The kind of personal data column `name` seems to hold, if any.
pub fn classify(name: &str) -> Option<Kind> {
    let w = words(name);
    let has = |x: &str| w.iter().any(|v| v == x);
    let any = |xs: &[&str]| w.iter().any(|v| xs.contains(&v.as_str()));
    // Two words in a row: `first name`, `date of` … `birth` is handled below.
    let pair = |a: &str, b: &str| w.windows(2).any(|p| p[0] == a && p[1] == b);
    let last_is = |x: &str| w.last().is_some_and(|v| v == x);

    // The specific before the general: an IP or email *address* is not a postal one.
    if any(&["ip", "ipv4", "ipv6", "ipaddr", "ipaddress"]) || pair("remote", "addr") {
        return Some(Kind::IpAddress);
    }
    if any(&["email", "mail", "emailaddress"]) {
        return Some(Kind::Email);
    }
    if any(&[
        "phone",
        "telephone",
        "tel",
        "mobile",
        "cell",
        "cellphone",
        "fax",
        "msisdn",
        "phonenumber",
    ]) {
        return Some(Kind::Phone);
    }
    if any(&[
        "dob",
        "birthday",
        "birthdate",
        "dateofbirth",
        "bday",
        "birth",
    ]) {
        return Some(Kind::DateOfBirth);
    }
    if any(&["iban"]) || pair("account", "number") || any(&["acct", "acctno", "accountno"]) {
        return Some(Kind::Iban);
    }
    if any(&["card", "pan", "cc", "ccnum", "cardnumber", "creditcard"]) {
        return Some(Kind::CardNumber);
    }
    if any(&["ssn", "passport", "nino", "nin", "sin", "tin", "taxid"])
        || pair("social", "security")
        || pair("national", "id")
        || pair("tax", "id")
    {
        return Some(Kind::NationalId);
    }
    // `login` alone is a user name; `last_login_at` is a time.
    if any(&[
        "username",
        "loginname",
        "nickname",
        "nick",
        "screenname",
        "handle",
    ]) || w == ["login"]
        || pair("user", "name")
        || pair("screen", "name")
        || pair("login", "name")
        || pair("nick", "name")
    {
        return Some(Kind::Username);
    }
    // `first` only before `name`: `first_seen` is no name.
    if any(&["firstname", "fname", "forename", "givenname"])
        || pair("first", "name")
        || pair("given", "name")
    {
        return Some(Kind::FirstName);
    }
    if any(&["lastname", "lname", "surname", "familyname"])
        || pair("last", "name")
        || pair("family", "name")
    {
        return Some(Kind::LastName);
    }
    if any(&["fullname", "displayname", "contactname", "customername"])
        || (w.len() == 1 && has("name"))
        || (last_is("name") && w.len() >= 2 && PERSON.contains(&w[w.len() - 2].as_str()))
    {
        return Some(Kind::FullName);
    }
    if any(&["postcode", "zip", "zipcode", "postal", "postalcode", "plz"])
        || pair("post", "code")
        || pair("zip", "code")
    {
        return Some(Kind::Postcode);
    }
    if any(&[
        "address",
        "addr",
        "street",
        "streetaddress",
        "address1",
        "address2",
        "addr1",
        "addr2",
    ]) || (has("line") && any(&["address", "addr"]))
    {
        return Some(Kind::Address);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_at_case_separators_and_digits() {
        assert_eq!(words("billingAddress2"), ["billing", "address", "2"]);
        assert_eq!(words("first_name"), ["first", "name"]);
        assert_eq!(words("E-Mail"), ["e", "mail"]);
        assert_eq!(words("addr_line1"), ["addr", "line", "1"]);
    }

    #[test]
    fn every_kind_in_names_and_abbreviations() {
        let cases: &[(&str, Kind)] = &[
            ("email", Kind::Email),
            ("contact_email", Kind::Email),
            ("emailAddress", Kind::Email),
            ("phone", Kind::Phone),
            ("mobile_no", Kind::Phone),
            ("tel", Kind::Phone),
            ("username", Kind::Username),
            ("user_name", Kind::Username),
            ("login", Kind::Username),
            ("first_name", Kind::FirstName),
            ("firstName", Kind::FirstName),
            ("fname", Kind::FirstName),
            ("given_name", Kind::FirstName),
            ("last_name", Kind::LastName),
            ("lname", Kind::LastName),
            ("surname", Kind::LastName),
            ("family_name", Kind::LastName),
            ("full_name", Kind::FullName),
            ("name", Kind::FullName),
            ("display_name", Kind::FullName),
            ("customer_name", Kind::FullName),
            ("address", Kind::Address),
            ("address_line_1", Kind::Address),
            ("addr1", Kind::Address),
            ("street", Kind::Address),
            ("billing_address2", Kind::Address),
            ("postcode", Kind::Postcode),
            ("zip", Kind::Postcode),
            ("postal_code", Kind::Postcode),
            ("zip_code", Kind::Postcode),
            ("ip", Kind::IpAddress),
            ("ip_address", Kind::IpAddress),
            ("last_login_ip", Kind::IpAddress),
            ("remote_addr", Kind::IpAddress),
            ("dob", Kind::DateOfBirth),
            ("date_of_birth", Kind::DateOfBirth),
            ("birth_date", Kind::DateOfBirth),
            ("birthday", Kind::DateOfBirth),
            ("iban", Kind::Iban),
            ("account_number", Kind::Iban),
            ("card_number", Kind::CardNumber),
            ("cc_num", Kind::CardNumber),
            ("pan", Kind::CardNumber),
            ("ssn", Kind::NationalId),
            ("passport_no", Kind::NationalId),
        ];
        for (name, kind) in cases {
            assert_eq!(classify(name), Some(*kind), "{name}");
        }
    }

    #[test]
    fn ordinary_columns_are_not_personal_data() {
        for name in [
            "id",
            "created_at",
            "filename",
            "product_name",
            "table_name",
            "first_seen",
            "last_login_at",
            "rename_count",
            "status",
            "total",
            "zipper_size",
            "description",
        ] {
            assert_eq!(classify(name), None, "{name}");
        }
    }

    #[test]
    fn suggestions_are_rules_that_parse() {
        for (column, kind) in [
            ("dob", Kind::DateOfBirth),
            ("first_name", Kind::FirstName),
            ("card", Kind::CardNumber),
            ("street", Kind::Address),
        ] {
            let text = format!(
                "[columns]\n\"public.t.{column}\" = {}\n",
                kind.suggested_rule(column)
            );
            let parsed: Result<super::super::AnonymizeConfig, _> = toml::from_str(&text);
            assert!(parsed.is_ok(), "{text}: {parsed:?}");
        }
    }
}
