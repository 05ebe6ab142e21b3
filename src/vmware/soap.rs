//! The vSphere Web Services wire format, as far as the client needs it: request
//! envelopes written from strings, and answers read into a small element tree.
//!
//! Pure: no I/O, so every parsing rule is tested here. It knows the SOAP 1.1
//! envelope, vSphere's managed object references (`<obj type="VirtualMachine">vm-42</obj>`),
//! `xsi:type` and faults; it does not know what any method means (that is
//! `client.rs`).
//!
//! `xsi:type` is matched by the attribute's namespace, not its prefix: govmomi's
//! simulator writes `XMLSchema-instance:type=` (with that prefix declared) where
//! vCenter writes `xsi:type=`, and both are the same attribute.

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;

/// The XML Schema instance namespace (`xsi:type`).
const XSI: &[u8] = b"http://www.w3.org/2001/XMLSchema-instance";
/// The SOAP 1.1 envelope namespace.
const SOAP_ENV: &[u8] = b"http://schemas.xmlsoap.org/soap/envelope/";

/// A managed object reference: a type and a server-chosen id (`vm-42`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Moref {
    pub kind: String,
    pub value: String,
}

impl Moref {
    pub fn new(kind: &str, value: &str) -> Self {
        Self { kind: kind.into(), value: value.into() }
    }

    /// `<NAME type="KIND">VALUE</NAME>`
    pub fn xml(&self, name: &str) -> String {
        format!(r#"<{name} type="{}">{}</{name}>"#, esc(&self.kind), esc(&self.value))
    }
}

impl std::fmt::Display for Moref {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.value)
    }
}

/// Escapes text or an attribute value.
pub fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    quick_xml::escape::escape(s)
}

/// `<NAME>escaped text</NAME>`
pub fn text_element(name: &str, text: &str) -> String {
    format!("<{name}>{}</{name}>", esc(text))
}

/// A request envelope around one method element, `body`, which must already be
/// XML (built with [`esc`], [`text_element`] and [`Moref::xml`]).
pub fn envelope(method: &str, body: &str) -> String {
    format!(
        concat!(
            r#"<?xml version="1.0" encoding="UTF-8"?>"#,
            r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" "#,
            r#"xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">"#,
            r#"<soapenv:Body><{m} xmlns="urn:vim25">{b}</{m}></soapenv:Body></soapenv:Envelope>"#
        ),
        m = method,
        b = body
    )
}

/// One element of an answer: its local name, its `xsi:type` (without prefix),
/// its `type` attribute (managed object references), its text and children.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Node {
    pub name: String,
    pub xsi_type: Option<String>,
    pub moref_type: Option<String>,
    pub text: String,
    pub children: Vec<Node>,
}

impl Node {
    /// The first child called `name`.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child called `name`.
    pub fn children<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The first element along `path` of child names.
    pub fn at(&self, path: &[&str]) -> Option<&Node> {
        path.iter().try_fold(self, |n, name| n.child(name))
    }

    /// The text of the element along `path`, trimmed.
    pub fn text_at(&self, path: &[&str]) -> Option<&str> {
        self.at(path).map(|n| n.text.trim())
    }

    /// This element read as a managed object reference.
    pub fn moref(&self) -> Option<Moref> {
        let kind = self.moref_type.as_deref()?;
        Some(Moref::new(kind, self.text.trim()))
    }

    /// The type of this element's value: `xsi:type` without its prefix.
    pub fn type_name(&self) -> Option<&str> {
        self.xsi_type.as_deref()
    }
}

/// A SOAP fault: the vSphere fault type (`InvalidArgument`, `InvalidLogin`,
/// ...), `faultstring`, and the fault's element for its fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub kind: String,
    pub message: String,
    pub detail: Option<Node>,
}

impl Fault {
    /// A field of the fault's detail (`invalidProperty` of an InvalidArgument).
    pub fn field(&self, name: &str) -> Option<&str> {
        self.detail.as_ref().and_then(|d| d.text_at(&[name]))
    }
}

/// What the Body of an answer held.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The method's response element (`RetrievePropertiesExResponse`, ...).
    Response(Node),
    Fault(Fault),
}

/// Reads an answer envelope.
pub fn parse_answer(xml: &[u8]) -> Result<Answer, String> {
    let root = parse(xml)?;
    if root.name != "Envelope" {
        return Err(format!("not a SOAP envelope (root element {})", root.name));
    }
    let body = root.child("Body").ok_or("the envelope has no Body")?;
    let first = body.children.first().ok_or("the Body is empty")?;
    if first.name != "Fault" {
        return Ok(Answer::Response(first.clone()));
    }
    let message = first.text_at(&["faultstring"]).unwrap_or_default().to_string();
    let detail = first.child("detail").and_then(|d| d.children.first()).cloned();
    let kind = detail
        .as_ref()
        .map(|d| {
            d.type_name().map(str::to_string).unwrap_or_else(|| d.name.strip_suffix("Fault").unwrap_or(&d.name).into())
        })
        .unwrap_or_else(|| first.text_at(&["faultcode"]).unwrap_or("unknown").to_string());
    Ok(Answer::Fault(Fault { kind, message, detail }))
}

/// Parses a whole document into its root element. Namespaces are resolved for
/// `xsi:type` and the envelope; element names are kept as local names.
pub fn parse(xml: &[u8]) -> Result<Node, String> {
    let mut reader = NsReader::from_reader(xml);
    reader.config_mut().trim_text(false);
    let mut stack: Vec<Node> = Vec::new();
    let mut buf = Vec::new();
    loop {
        let event =
            reader.read_event_into(&mut buf).map_err(|e| format!("XML at byte {}: {e}", reader.buffer_position()))?;
        match event {
            Event::Start(start) => stack.push(open(&reader, &start)?),
            Event::Empty(start) => {
                let node = open(&reader, &start)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => return Ok(node),
                }
            }
            Event::End(_) => {
                let node = stack.pop().ok_or("unbalanced XML")?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => return Ok(node),
                }
            }
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&t.unescape().map_err(|e| format!("XML text: {e}"))?);
                }
            }
            Event::CData(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::Eof => return Err("the document ends inside an element".into()),
            _ => {}
        }
        buf.clear();
    }
}

fn open(reader: &NsReader<&[u8]>, start: &BytesStart<'_>) -> Result<Node, String> {
    let name = String::from_utf8_lossy(start.local_name().as_ref()).into_owned();
    if name == "Envelope" || name == "Body" || name == "Fault" {
        // Only SOAP's own Envelope, Body and Fault count as such.
        let (ns, _) = reader.resolve_element(start.name());
        if let ResolveResult::Bound(ns) = ns
            && ns.as_ref() != SOAP_ENV
        {
            return Ok(Node { name: format!("{{other}}{name}"), ..Node::default() });
        }
    }
    let mut node = Node { name, ..Node::default() };
    for attr in start.attributes() {
        let attr = attr.map_err(|e| format!("XML attribute: {e}"))?;
        let (ns, local) = reader.resolve_attribute(attr.key);
        let value = attr.unescape_value().map_err(|e| format!("XML attribute: {e}"))?.into_owned();
        match (ns, local.as_ref()) {
            (ResolveResult::Bound(ns), b"type") if ns.as_ref() == XSI => {
                let bare = value.rsplit(':').next().unwrap_or(&value).to_string();
                node.xsi_type = Some(bare);
            }
            (ResolveResult::Unbound, b"type") => node.moref_type = Some(value),
            _ => {}
        }
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(body: &str) -> Answer {
        let doc = format!(
            r#"<?xml version="1.0"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>{body}</soapenv:Body></soapenv:Envelope>"#
        );
        parse_answer(doc.as_bytes()).unwrap()
    }

    fn response(body: &str) -> Node {
        match answer(body) {
            Answer::Response(r) => r,
            other => panic!("not a response: {other:?}"),
        }
    }

    fn fault(body: &str) -> Fault {
        match answer(body) {
            Answer::Fault(f) => f,
            other => panic!("not a fault: {other:?}"),
        }
    }

    #[test]
    fn xsi_type_is_matched_by_namespace_not_prefix() {
        // vCenter's spelling and govmomi's simulator's spelling of the same attribute.
        for attr in [
            r#"xsi:type="xsd:string""#,
            r#"xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="string""#,
        ] {
            let r = response(&format!(r#"<R xmlns="urn:vim25"><val {attr}>x</val></R>"#));
            assert_eq!(r.child("val").unwrap().type_name(), Some("string"), "{attr}");
        }
        // Another namespace's "type" is not xsi:type.
        let r = response(r#"<R xmlns:o="urn:other"><val o:type="Nope">x</val></R>"#);
        assert_eq!(r.child("val").unwrap().type_name(), None);
    }

    #[test]
    fn morefs_text_and_entities() {
        let r = response(
            r#"<FindByInventoryPathResponse xmlns="urn:vim25"><returnval type="VirtualMachine">vm-42</returnval><name>a &amp; b&#x21;</name></FindByInventoryPathResponse>"#,
        );
        assert_eq!(r.name, "FindByInventoryPathResponse");
        assert_eq!(r.child("returnval").unwrap().moref(), Some(Moref::new("VirtualMachine", "vm-42")));
        assert_eq!(r.text_at(&["name"]), Some("a & b!"));
        assert_eq!(r.at(&["returnval", "nothing"]), None);
    }

    #[test]
    fn faults_carry_their_type_and_fields() {
        let f = fault(
            r#"<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>A specified parameter was not correct: changeId</faultstring><detail><InvalidArgumentFault xmlns="urn:vim25" xsi:type="InvalidArgument"><invalidProperty>changeId</invalidProperty></InvalidArgumentFault></detail></soapenv:Fault>"#,
        );
        assert_eq!(f.kind, "InvalidArgument");
        assert_eq!(f.field("invalidProperty"), Some("changeId"));
        assert!(f.message.ends_with("changeId"));

        // Without xsi:type the element name says it; without detail, the code.
        let f = fault(
            r#"<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>no</faultstring><detail><InvalidLoginFault xmlns="urn:vim25"/></detail></soapenv:Fault>"#,
        );
        assert_eq!(f.kind, "InvalidLogin");
        let f = fault(
            r#"<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>bad</faultstring></soapenv:Fault>"#,
        );
        assert_eq!((f.kind.as_str(), f.message.as_str()), ("ServerFaultCode", "bad"));
    }

    #[test]
    fn broken_documents_are_errors() {
        for doc in ["", "<a><b></a>", "<a>", "not xml", "<html><body>502 Bad Gateway</body></html>"] {
            assert!(parse_answer(doc.as_bytes()).is_err(), "{doc:?}");
        }
    }

    #[test]
    fn requests_escape_their_text() {
        let body =
            format!("{}{}", Moref::new("VirtualMachine", "vm-1").xml("_this"), text_element("name", "a<b&\"c\""));
        let env = envelope("CreateSnapshot_Task", &body);
        let root = parse(env.as_bytes()).unwrap();
        let call = root.at(&["Body", "CreateSnapshot_Task"]).unwrap();
        assert_eq!(call.text_at(&["name"]), Some("a<b&\"c\""));
        assert_eq!(call.child("_this").unwrap().moref(), Some(Moref::new("VirtualMachine", "vm-1")));
    }
}
