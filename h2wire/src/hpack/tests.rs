//! HPACK tests: the examples of RFC 7541 Appendix C, the size update rules, limits, and
//! properties (round trips with the tables in step, no panics on any input).

use proptest::prelude::*;

use super::*;

/// Bytes from a hex dump as the RFC prints them (whitespace ignored).
fn hex(dump: &str) -> Vec<u8> {
    let digits: Vec<u8> = dump.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert_eq!(digits.len() % 2, 0, "odd hex dump");
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

fn decode(decoder: &mut Decoder, block: &[u8]) -> Result<Vec<(String, String)>, DecodeError> {
    let mut fields = Vec::new();
    decoder
        .decode(block, |f: Field<'_>| {
            fields.push((
                String::from_utf8(f.name.to_vec()).unwrap(),
                String::from_utf8(f.value.to_vec()).unwrap(),
            ));
        })
        .map(|()| fields)
}

fn owned(fields: &[(&str, &str)]) -> Vec<(String, String)> {
    fields
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect()
}

/// Checks the table against the RFC's "Dynamic Table (after decoding)": entries newest first,
/// and the table size.
fn assert_table(table: &DynamicTable, entries: &[(&str, &str)], size: usize) {
    let actual: Vec<(String, String)> = table
        .iter()
        .map(|(n, v)| {
            (
                String::from_utf8(n.to_vec()).unwrap(),
                String::from_utf8(v.to_vec()).unwrap(),
            )
        })
        .collect();
    assert_eq!(actual, owned(entries));
    assert_eq!(table.size(), size);
}

/// A header list, the table after decoding it (newest first), and the table's size.
type Expected = (
    &'static [(&'static str, &'static str)],
    &'static [(&'static str, &'static str)],
    usize,
);

/// A field of a generated list: name, value, never indexed.
type GenField = (Vec<u8>, Vec<u8>, bool);

fn limits(max_table_size: usize) -> DecoderLimits {
    DecoderLimits {
        max_table_size,
        ..DecoderLimits::default()
    }
}

#[test]
fn c2_header_field_representations() {
    // C.2.1: literal with indexing, new name.
    let mut decoder = Decoder::new(DecoderLimits::default());
    let block = hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573
                     746f 6d2d 6865 6164 6572");
    assert_eq!(
        decode(&mut decoder, &block).unwrap(),
        owned(&[("custom-key", "custom-header")])
    );
    assert_table(decoder.table(), &[("custom-key", "custom-header")], 55);

    // C.2.2: literal without indexing, indexed name.
    let mut decoder = Decoder::new(DecoderLimits::default());
    let block = hex("040c 2f73 616d 706c 652f 7061 7468");
    assert_eq!(
        decode(&mut decoder, &block).unwrap(),
        owned(&[(":path", "/sample/path")])
    );
    assert_table(decoder.table(), &[], 0);

    // C.2.3: literal never indexed, new name; reported as sensitive.
    let mut decoder = Decoder::new(DecoderLimits::default());
    let block = hex("1008 7061 7373 776f 7264 0673 6563 7265 74");
    let mut sensitive = Vec::new();
    decoder
        .decode(&block, |f: Field<'_>| {
            sensitive.push((f.name.to_vec(), f.value.to_vec(), f.sensitive));
        })
        .unwrap();
    assert_eq!(
        sensitive,
        [(b"password".to_vec(), b"secret".to_vec(), true)]
    );
    assert_table(decoder.table(), &[], 0);

    // C.2.4: indexed field.
    let mut decoder = Decoder::new(DecoderLimits::default());
    assert_eq!(
        decode(&mut decoder, &hex("82")).unwrap(),
        owned(&[(":method", "GET")])
    );
    assert_table(decoder.table(), &[], 0);
}

const REQUEST_1: [(&str, &str); 4] = [
    (":method", "GET"),
    (":scheme", "http"),
    (":path", "/"),
    (":authority", "www.example.com"),
];
const REQUEST_2: [(&str, &str); 5] = [
    (":method", "GET"),
    (":scheme", "http"),
    (":path", "/"),
    (":authority", "www.example.com"),
    ("cache-control", "no-cache"),
];
const REQUEST_3: [(&str, &str); 5] = [
    (":method", "GET"),
    (":scheme", "https"),
    (":path", "/index.html"),
    (":authority", "www.example.com"),
    ("custom-key", "custom-value"),
];
const TABLE_1: [(&str, &str); 1] = [(":authority", "www.example.com")];
const TABLE_2: [(&str, &str); 2] = [
    ("cache-control", "no-cache"),
    (":authority", "www.example.com"),
];
const TABLE_3: [(&str, &str); 3] = [
    ("custom-key", "custom-value"),
    ("cache-control", "no-cache"),
    (":authority", "www.example.com"),
];

/// C.3 and C.4: the same three requests on one connection, without and with Huffman coding.
fn check_requests(blocks: [&str; 3]) {
    let mut decoder = Decoder::new(DecoderLimits::default());
    let expected: [Expected; 3] = [
        (&REQUEST_1, &TABLE_1, 57),
        (&REQUEST_2, &TABLE_2, 110),
        (&REQUEST_3, &TABLE_3, 164),
    ];
    for (block, (fields, table, size)) in blocks.iter().zip(expected) {
        assert_eq!(decode(&mut decoder, &hex(block)).unwrap(), owned(fields));
        assert_table(decoder.table(), table, size);
    }
}

const C3: [&str; 3] = [
    "8286 8441 0f77 7777 2e65 7861 6d70 6c65
     2e63 6f6d",
    "8286 84be 5808 6e6f 2d63 6163 6865",
    "8287 85bf 400a 6375 7374 6f6d 2d6b 6579
     0c63 7573 746f 6d2d 7661 6c75 65",
];

const C4: [&str; 3] = [
    "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4
     ff",
    "8286 84be 5886 a8eb 1064 9cbf",
    "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925
     a849 e95b b8e8 b4bf",
];

#[test]
fn c3_requests_without_huffman() {
    check_requests(C3);
}

#[test]
fn c4_requests_with_huffman() {
    check_requests(C4);
}

#[test]
fn the_encoder_writes_the_c4_requests() {
    // The policy (index what repeats, Huffman when shorter) gives exactly the RFC's blocks.
    let mut encoder = Encoder::new(DEFAULT_TABLE_SIZE);
    let requests: [&[(&str, &str)]; 3] = [&REQUEST_1, &REQUEST_2, &REQUEST_3];
    for (fields, expected) in requests.iter().zip(C4) {
        let mut block = Vec::new();
        encoder.encode(
            fields
                .iter()
                .map(|(n, v)| Field::new(n.as_bytes(), v.as_bytes())),
            &mut block,
        );
        assert_eq!(block, hex(expected));
    }
    assert_table(encoder.table(), &TABLE_3, 164);
}

const RESPONSE_1: [(&str, &str); 4] = [
    (":status", "302"),
    ("cache-control", "private"),
    ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
    ("location", "https://www.example.com"),
];
const RESPONSE_2: [(&str, &str); 4] = [
    (":status", "307"),
    ("cache-control", "private"),
    ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
    ("location", "https://www.example.com"),
];
const RESPONSE_3: [(&str, &str); 6] = [
    (":status", "200"),
    ("cache-control", "private"),
    ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
    ("location", "https://www.example.com"),
    ("content-encoding", "gzip"),
    (
        "set-cookie",
        "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
    ),
];
const RESPONSE_TABLE_1: [(&str, &str); 4] = [
    ("location", "https://www.example.com"),
    ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
    ("cache-control", "private"),
    (":status", "302"),
];
// (":status", "302") was evicted to make room for (":status", "307").
const RESPONSE_TABLE_2: [(&str, &str); 4] = [
    (":status", "307"),
    ("location", "https://www.example.com"),
    ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
    ("cache-control", "private"),
];
// Several entries were evicted while this list was decoded.
const RESPONSE_TABLE_3: [(&str, &str); 3] = [
    (
        "set-cookie",
        "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
    ),
    ("content-encoding", "gzip"),
    ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
];

/// C.5 and C.6: three responses with a table of 256 bytes, so entries get evicted.
fn check_responses(blocks: [&str; 3]) {
    let mut decoder = Decoder::new(limits(256));
    let expected: [Expected; 3] = [
        (&RESPONSE_1, &RESPONSE_TABLE_1, 222),
        (&RESPONSE_2, &RESPONSE_TABLE_2, 222),
        (&RESPONSE_3, &RESPONSE_TABLE_3, 215),
    ];
    for (block, (fields, table, size)) in blocks.iter().zip(expected) {
        assert_eq!(decode(&mut decoder, &hex(block)).unwrap(), owned(fields));
        assert_table(decoder.table(), table, size);
    }
}

#[test]
fn c5_responses_without_huffman() {
    check_responses([
        "4803 3330 3258 0770 7269 7661 7465 611d
         4d6f 6e2c 2032 3120 4f63 7420 3230 3133
         2032 303a 3133 3a32 3120 474d 546e 1768
         7474 7073 3a2f 2f77 7777 2e65 7861 6d70
         6c65 2e63 6f6d",
        "4803 3330 37c1 c0bf",
        "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420
         3230 3133 2032 303a 3133 3a32 3220 474d
         54c0 5a04 677a 6970 7738 666f 6f3d 4153
         444a 4b48 514b 425a 584f 5157 454f 5049
         5541 5851 5745 4f49 553b 206d 6178 2d61
         6765 3d33 3630 303b 2076 6572 7369 6f6e
         3d31",
    ]);
}

#[test]
fn c6_responses_with_huffman() {
    check_responses([
        "4882 6402 5885 aec3 771a 4b61 96d0 7abe
         9410 54d4 44a8 2005 9504 0b81 66e0 82a6
         2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8
         e9ae 82ae 43d3",
        "4883 640e ffc1 c0bf",
        "88c1 6196 d07a be94 1054 d444 a820 0595
         040b 8166 e084 a62d 1bff c05a 839b d9ab
         77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b
         3960 d5af 2708 7f36 72c1 ab27 0fb5 291f
         9587 3160 65c0 03ed 4ee5 b106 3d50 07",
    ]);
}

#[test]
fn invalid_indexes() {
    let mut decoder = Decoder::new(DecoderLimits::default());
    assert_eq!(
        decode(&mut decoder, &[0x80]),
        Err(DecodeError::InvalidIndex(0))
    );
    assert_eq!(
        decode(&mut decoder, &[0xbe]),
        Err(DecodeError::InvalidIndex(62))
    );
    // A literal naming a dynamic entry that does not exist.
    assert_eq!(
        decode(&mut decoder, &[0x7e, 0x00]),
        Err(DecodeError::InvalidIndex(62))
    );
    assert_eq!(
        decode(&mut decoder, &[0x0f, 0x2f, 0x00]),
        Err(DecodeError::InvalidIndex(62))
    );
    // Index 61 is the last static entry.
    assert_eq!(
        decode(&mut decoder, &[0xbd]).unwrap(),
        owned(&[("www-authenticate", "")])
    );
    // Truncations.
    assert_eq!(decode(&mut decoder, &[0x40]), Err(DecodeError::Truncated));
    assert_eq!(
        decode(&mut decoder, &[0x40, 0x01]),
        Err(DecodeError::Truncated)
    );
    assert_eq!(
        decode(&mut decoder, &[0x40, 0x01, b'a']),
        Err(DecodeError::Truncated)
    );
    assert_eq!(decode(&mut decoder, &[0xff]), Err(DecodeError::Truncated));
    // Bad Huffman: a whole byte of padding.
    assert_eq!(
        decode(&mut decoder, &[0x04, 0x81, 0xff]),
        Err(DecodeError::InvalidHuffman)
    );
}

#[test]
fn size_updates() {
    // An update must open the block.
    let mut decoder = Decoder::new(DecoderLimits::default());
    assert_eq!(
        decode(&mut decoder, &[0x82, 0x20]),
        Err(DecodeError::SizeUpdateNotAtStart)
    );
    // And not exceed the setting.
    let mut decoder = Decoder::new(DecoderLimits::default());
    assert_eq!(
        decode(&mut decoder, &[0x3f, 0xe2, 0x1f]), // 4097
        Err(DecodeError::SizeUpdateTooLarge {
            size: 4097,
            limit: 4096
        })
    );
    // Two are allowed (the smallest, then the final size); three are not.
    let mut decoder = Decoder::new(DecoderLimits::default());
    assert_eq!(
        decode(&mut decoder, &[0x20, 0x3f, 0x01, 0x82])
            .unwrap()
            .len(),
        1
    );
    assert_eq!(decoder.table().max_size(), 32);
    assert_eq!(
        decode(&mut decoder, &[0x20, 0x20, 0x20]),
        Err(DecodeError::TooManySizeUpdates)
    );

    // After our setting went down, the next block must begin with an update that fits.
    let mut decoder = Decoder::new(DecoderLimits::default());
    decode(&mut decoder, &hex(C3[0])).unwrap();
    decoder.set_max_table_size(0);
    assert_eq!(
        decode(&mut decoder, &[0x82]),
        Err(DecodeError::SizeUpdateMissing)
    );
    let mut decoder = Decoder::new(DecoderLimits::default());
    decode(&mut decoder, &hex(C3[0])).unwrap();
    decoder.set_max_table_size(0);
    assert_eq!(
        decode(&mut decoder, &[]),
        Err(DecodeError::SizeUpdateMissing)
    );
    assert_eq!(decode(&mut decoder, &[0x20, 0x82]).unwrap().len(), 1);
    assert!(decoder.table().is_empty());
    // A higher setting needs no update; the table stays at its size until the peer sends one.
    decoder.set_max_table_size(8192);
    assert_eq!(decode(&mut decoder, &[0x82]).unwrap().len(), 1);
    assert_eq!(decoder.table().max_size(), 0);
}

#[test]
fn the_encoder_signals_the_smallest_size_then_the_final_one() {
    let mut encoder = Encoder::new(DEFAULT_TABLE_SIZE);
    let mut decoder = Decoder::new(DecoderLimits::default());
    let mut block = Vec::new();
    encoder.encode([Field::new(b"x-a", b"1")], &mut block);
    decode(&mut decoder, &block).unwrap();
    assert_eq!(encoder.table().len(), 1);

    // The peer's setting goes to 0 and back: the table must be flushed on both sides.
    encoder.set_max_table_size(0);
    encoder.set_max_table_size(4096);
    let mut block = Vec::new();
    encoder.encode([Field::new(b"x-a", b"1")], &mut block);
    assert_eq!(&block[..4], [0x20, 0x3f, 0xe1, 0x1f]);
    decode(&mut decoder, &block).unwrap();
    assert_eq!(decoder.table(), encoder.table());
    assert_eq!(encoder.table().len(), 1);

    // No change, no update.
    let mut block = Vec::new();
    encoder.encode([Field::new(b":method", b"GET")], &mut block);
    assert_eq!(block, [0x82]);

    // A preference below the default is signaled in the first block.
    let mut encoder = Encoder::new(100);
    let mut block = Vec::new();
    encoder.encode([Field::new(b":method", b"GET")], &mut block);
    assert_eq!(block, [0x3f, 0x45, 0x82]);
    // The peer allows more: the preference still holds, and nothing changes.
    encoder.set_max_table_size(65536);
    let mut block = Vec::new();
    encoder.encode([Field::new(b":method", b"GET")], &mut block);
    assert_eq!(block, [0x82]);
}

#[test]
fn sensitive_fields_are_never_indexed() {
    let mut encoder = Encoder::new(DEFAULT_TABLE_SIZE);
    let mut decoder = Decoder::new(DecoderLimits::default());
    let fields = [
        Field::new(b"authorization", b"Bearer abc"),
        Field::new(b"cookie", b"short=1"),
        Field::new(b"cookie", b"long-session-identifier=0123456789"),
        Field::sensitive(b"x-secret", b"s"),
        Field::new(b"x-plain", b"p"),
    ];
    for _ in 0..2 {
        let mut block = Vec::new();
        encoder.encode(fields, &mut block);
        let mut seen = Vec::new();
        decoder
            .decode(&block, |f: Field<'_>| seen.push(f.sensitive))
            .unwrap();
        assert_eq!(seen, [true, true, false, true, false]);
        assert_eq!(decoder.table(), encoder.table());
    }
    // Only the long cookie and x-plain went into the table.
    assert_eq!(encoder.table().len(), 2);
    // A never-indexed field starts with 0001.
    let mut block = Vec::new();
    encoder.encode([Field::new(b"authorization", b"x")], &mut block);
    assert_eq!(block[0] & 0xf0, 0x10);
}

#[test]
fn values_unique_to_a_message_are_not_indexed() {
    let mut encoder = Encoder::new(DEFAULT_TABLE_SIZE);
    let mut block = Vec::new();
    encoder.encode(
        [
            Field::new(b"content-length", b"123"),
            Field::new(b"grpc-timeout", b"99m"),
            Field::new(b":path", b"/a?b=1"),
            Field::new(b":path", b"/pkg.Service/Method"),
            Field::new(b"x-big", &[b'a'; 4000]),
        ],
        &mut block,
    );
    let entries: Vec<_> = encoder.table().iter().collect();
    assert_eq!(entries, [(&b":path"[..], &b"/pkg.Service/Method"[..])]);
}

#[test]
fn header_list_size_is_limited_but_the_table_stays_in_step() {
    let mut encoder = Encoder::new(DEFAULT_TABLE_SIZE);
    let mut decoder = Decoder::new(DecoderLimits {
        max_header_list_size: 100,
        ..DecoderLimits::default()
    });
    let mut block = Vec::new();
    encoder.encode(
        [
            Field::new(b"x-a", b"0123456789"), // 45
            Field::new(b"x-b", b"0123456789"), // 90
            Field::new(b"x-c", b"0123456789"), // 135: over
            Field::new(b"x-d", b"0123456789"),
        ],
        &mut block,
    );
    let mut names = Vec::new();
    let result = decoder.decode(&block, |f: Field<'_>| names.push(f.name.to_vec()));
    assert_eq!(result, Err(DecodeError::HeaderListTooLarge { limit: 100 }));
    assert_eq!(names, [b"x-a".to_vec(), b"x-b".to_vec()]);
    assert!(
        !result
            .unwrap_err()
            .into_error(StreamId::new(1))
            .is_connection_error()
    );
    // All four were inserted, as on the encoder's side: the next block decodes.
    assert_eq!(decoder.table(), encoder.table());
    let mut block = Vec::new();
    encoder.encode([Field::new(b"x-d", b"0123456789")], &mut block);
    assert_eq!(block, [0xbe]);
    assert_eq!(decode(&mut decoder, &block).unwrap().len(), 1);
}

#[test]
fn string_length_is_limited() {
    let mut decoder = Decoder::new(DecoderLimits {
        max_string_len: 4,
        ..DecoderLimits::default()
    });
    assert_eq!(
        decode(&mut decoder, b"\x40\x01a\x05abcde"),
        Err(DecodeError::StringTooLong { limit: 4 })
    );
    // Huffman-coded: 3 bytes that decode to 5.
    let mut block = vec![0x40, 0x01, b'a'];
    primitive::encode_string(b"00000", &mut block);
    assert_eq!(
        decode(&mut decoder, &block),
        Err(DecodeError::StringTooLong { limit: 4 })
    );
    assert!(
        DecodeError::StringTooLong { limit: 4 }
            .into_error(StreamId::new(1))
            .is_connection_error()
    );
}

#[test]
fn a_literal_may_name_the_entry_its_insertion_evicts() {
    // RFC 7541 §4.4: the name must survive the eviction of the entry it comes from.
    let mut decoder = Decoder::new(limits(60));
    decode(&mut decoder, b"\x40\x0acustom-key\x0dcustom-header").unwrap(); // 55
    let fields = decode(&mut decoder, b"\x7e\x02v2").unwrap(); // name index 62
    assert_eq!(fields, owned(&[("custom-key", "v2")]));
    assert_table(decoder.table(), &[("custom-key", "v2")], 44);
}

// --- Properties ---

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Names of the static table and of the encoder's policy, to hit their paths.
        3 => prop::sample::select(vec![
            ":method", ":path", ":authority", ":status", "content-type", "cookie",
            "authorization", "grpc-timeout", "user-agent", "te", "date",
        ])
        .prop_map(|n| n.as_bytes().to_vec()),
        7 => "[a-z0-9!#$%&'*+.^_`|~-]{1,24}".prop_map(String::into_bytes),
    ]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => prop::sample::select(vec!["GET", "/", "200", "", "trailers", "application/grpc"])
            .prop_map(|v| v.as_bytes().to_vec()),
        6 => proptest::collection::vec(0x20u8..=0x7e, 0..40),
        1 => proptest::collection::vec(any::<u8>(), 0..300),
    ]
}

fn field() -> impl Strategy<Value = GenField> {
    (name(), value(), prop::bool::weighted(0.1))
}

/// A block: the table size settings applied before it (0 to 2), then its fields.
fn blocks() -> impl Strategy<Value = Vec<(Vec<usize>, Vec<GenField>)>> {
    let setting = prop_oneof![Just(0usize), 0usize..300, Just(4096usize), 0usize..9000];
    proptest::collection::vec(
        (
            proptest::collection::vec(setting, 0..=2),
            proptest::collection::vec(field(), 0..12),
        ),
        1..12,
    )
}

proptest! {
    /// Encoding and decoding gives back every list, with the never-indexed flag kept, and
    /// the two tables equal after every block, through changes of the table size setting.
    #[test]
    fn encode_decode_round_trip(preferred in prop_oneof![Just(4096usize), 0usize..10_000], blocks in blocks()) {
        let mut encoder = Encoder::new(preferred);
        let mut decoder = Decoder::new(DecoderLimits {
            max_header_list_size: usize::MAX,
            ..DecoderLimits::default()
        });
        for (settings, fields) in blocks {
            for setting in settings {
                // The peer receives our SETTINGS and applies it; we apply it at its ACK.
                encoder.set_max_table_size(setting);
                decoder.set_max_table_size(setting);
            }
            let mut block = Vec::new();
            encoder.encode(
                fields.iter().map(|(n, v, s)| Field { name: n, value: v, sensitive: *s }),
                &mut block,
            );
            let mut decoded = Vec::new();
            decoder
                .decode(&block, |f: Field<'_>| decoded.push((f.name.to_vec(), f.value.to_vec(), f.sensitive)))
                .unwrap();
            prop_assert_eq!(decoded.len(), fields.len());
            for ((name, value, sensitive), (n, v, s)) in decoded.iter().zip(&fields) {
                prop_assert_eq!(name, n);
                prop_assert_eq!(value, v);
                prop_assert!(*sensitive || !*s, "lost the never-indexed flag");
            }
            prop_assert_eq!(decoder.table(), encoder.table());
            prop_assert!(encoder.table().max_size() <= preferred);
        }
    }

    /// Any bytes: an error or fields, never a panic, on a decoder that keeps its state from
    /// block to block.
    #[test]
    fn arbitrary_blocks_never_panic(
        max_table_size in 0usize..5000,
        max_string_len in 0usize..100,
        blocks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 1..6),
    ) {
        let mut decoder = Decoder::new(DecoderLimits {
            max_table_size,
            max_header_list_size: 500,
            max_string_len,
        });
        for block in blocks {
            let _ = decoder.decode(&block, |_: Field<'_>| {});
            prop_assert!(decoder.table().size() <= decoder.table().max_size());
        }
    }

    /// Valid blocks with a few bytes changed: the inputs most likely to reach deep paths.
    #[test]
    fn mutated_blocks_never_panic(
        fields in proptest::collection::vec(field(), 1..10),
        changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut block = Vec::new();
        Encoder::new(4096).encode(
            fields.iter().map(|(n, v, s)| Field { name: n, value: v, sensitive: *s }),
            &mut block,
        );
        for (index, byte) in changes {
            let i = index.index(block.len());
            block[i] = byte;
        }
        let mut decoder = Decoder::new(DecoderLimits::default());
        let _ = decoder.decode(&block, |_: Field<'_>| {});
        let _ = decoder.decode(&block, |_: Field<'_>| {});
    }
}
