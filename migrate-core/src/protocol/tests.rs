//! Round trips and hostile input for every message and the batch header.

use super::wire::*;
use super::*;
use crate::memory::tests::sample_layout as layout;

fn all_messages() -> Vec<Message> {
    vec![
        Message::Hello {
            min_version: 1,
            max_version: 3,
            session: 0xdead_beef,
            data_streams: 4,
            features: FEATURE_ZSTD,
        },
        Message::Welcome {
            version: 1,
            features: 0,
        },
        Message::Layout { layout: layout() },
        Message::LayoutAccepted,
        Message::DestinationMemory { reads_zero: true },
        Message::Join {
            session: 7,
            index: 3,
        },
        Message::RoundEnd {
            round: 9,
            batches: 1234,
        },
        Message::RoundDone {
            round: 9,
            last: true,
        },
        Message::RoundAck {
            round: 9,
            suspect: vec![PageRange {
                region: 1,
                first: 2,
                count: 3,
            }],
        },
        Message::VerifyRequest,
        Message::PageHashes {
            region: 0,
            first: 16,
            hashes: vec![1, 2, 3],
        },
        Message::DeviceState {
            last: false,
            bytes: b"registers".to_vec(),
        },
        Message::Commit,
        Message::Committed,
        Message::Abort {
            reason: "operator said so".into(),
        },
        Message::Refused {
            code: RefusalCode::Layout,
            message: "region 1 differs".into(),
        },
        Message::RdmaConnect {
            qps: vec![QpEndpoint {
                qpn: 17,
                psn: 0x123456,
                gid: [7; 16],
            }],
        },
        Message::RdmaAccept {
            qps: vec![QpEndpoint {
                qpn: 18,
                psn: 1,
                gid: [1; 16],
            }],
            regions: vec![RemoteRegion {
                addr: 0x7f00_0000_0000,
                rkey: 0xabc,
                len: 1 << 30,
            }],
        },
        Message::ZeroPages {
            round: 2,
            ranges: vec![PageRange {
                region: 0,
                first: 5,
                count: 9,
            }],
        },
        Message::PostcopyStart {
            last: true,
            ranges: vec![PageRange {
                region: 1,
                first: 40,
                count: 2,
            }],
        },
        Message::PageRequest {
            ranges: vec![PageRange {
                region: 0,
                first: 3,
                count: 1,
            }],
        },
        Message::PostcopyPages {
            region: 1,
            first: 40,
            demand: true,
            bytes: vec![0xab; 64],
        },
        Message::PostcopyMissing {
            last: false,
            ranges: vec![PageRange {
                region: 0,
                first: 8,
                count: 4,
            }],
        },
        Message::PostcopyDone {
            faults: 12,
            p50_us: 80,
            p99_us: 900,
            max_us: 1200,
            demand_pages: 30,
            pushed_pages: 70,
        },
        Message::RdmaReadOffer {
            qps: vec![QpEndpoint {
                qpn: 19,
                psn: 2,
                gid: [3; 16],
            }],
            regions: vec![RemoteRegion {
                addr: 0x7f00_1000_0000,
                rkey: 0xdef,
                len: 1 << 20,
            }],
        },
        Message::RdmaReadAccept {
            qps: vec![QpEndpoint {
                qpn: 20,
                psn: 3,
                gid: [4; 16],
            }],
        },
        Message::RdmaReadDeclined {
            reason: "no device".into(),
        },
        Message::PostcopyAccepted,
        Message::PostcopyPrepare {
            last: true,
            ranges: vec![PageRange {
                region: 0,
                first: 1,
                count: 7,
            }],
        },
        Message::PostcopyPrepared,
        Message::PageFetchOffer,
        Message::PageFetchAccept,
        Message::EpochPages {
            epoch: 3,
            last: true,
            ranges: vec![PageRange {
                region: 0,
                first: 9,
                count: 2,
            }],
        },
        Message::EpochOutput {
            last: false,
            bytes: b"17 a->b 5\n".to_vec(),
        },
        Message::EpochEnd {
            epoch: 3,
            checkpoint: true,
        },
        Message::EpochApplied { epoch: 3 },
        Message::EpochRefused {
            epoch: 4,
            reason: "batch check".into(),
        },
        Message::ProtectEnd,
        Message::ProtectEnded,
        Message::WitnessClaim {
            session: 7,
            claimant: 2,
        },
        Message::WitnessVerdict { granted: true },
    ]
}

#[test]
fn every_message_round_trips_through_a_stream() {
    let mut wire = Vec::new();
    write_preamble(&mut wire).unwrap();
    for m in all_messages() {
        write_message(&mut wire, &m).unwrap();
    }
    let mut r = &wire[..];
    assert_eq!(read_preamble(&mut r).unwrap(), VERSION);
    for m in all_messages() {
        assert_eq!(read_message(&mut r).unwrap(), m);
    }
    assert!(r.is_empty());
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    for m in all_messages() {
        let mut wire = Vec::new();
        write_message(&mut wire, &m).unwrap();
        for cut in 0..wire.len() {
            let err = read_message(&mut &wire[..cut]).unwrap_err();
            assert!(err.is_disconnect(), "{m:?} cut at {cut}: {err}");
            // Only a stream that ends where a frame could begin was
            // closed between frames; anything later cut one.
            assert_eq!(
                matches!(err, ProtocolError::Closed(_)),
                cut == 0,
                "{m:?} cut at {cut}: {err}"
            );
        }
    }
}

#[test]
fn every_flipped_bit_is_caught() {
    for m in all_messages() {
        let mut wire = Vec::new();
        write_message(&mut wire, &m).unwrap();
        for bit in 0..wire.len() * 8 {
            let mut bad = wire.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            // Never a panic, never the original message.
            if let Ok(got) = read_message(&mut &bad[..]) {
                panic!("{m:?} with bit {bit} flipped decoded as {got:?}");
            }
        }
    }
}

#[test]
fn hostile_payloads_are_refused_without_big_allocations() {
    // Layout claiming 2^32-1 regions in a 4-byte payload.
    let payload = u32::MAX.to_le_bytes();
    assert!(matches!(
        Message::decode(FrameKind::Layout, &payload),
        Err(ProtocolError::Malformed { .. })
    ));
    // Frame length over the limit.
    let h = FrameHeader {
        kind: FrameKind::DeviceState,
        flags: 0,
        len: MAX_FRAME + 1,
        check: 0,
    };
    assert!(matches!(
        FrameHeader::from_bytes(&h.to_bytes()),
        Err(ProtocolError::FrameTooLarge { .. })
    ));
    // A huge announced length with no bytes behind it: truncated, and the
    // reader did not allocate the announced size up front.
    let h = FrameHeader {
        kind: FrameKind::DeviceState,
        flags: 0,
        len: MAX_FRAME,
        check: 0,
    };
    assert!(
        read_message(&mut &h.to_bytes()[..])
            .unwrap_err()
            .is_disconnect()
    );
    // Unknown kind, bad magic, trailing bytes, bad page size.
    assert!(matches!(
        FrameHeader::from_bytes(&[200; 16]),
        Err(ProtocolError::UnknownKind(200))
    ));
    assert!(matches!(
        read_preamble(&mut &b"GET / HTTP/1.1\r\n"[..]),
        Err(ProtocolError::BadMagic { .. })
    ));
    assert!(Message::decode(FrameKind::Commit, &[0]).is_err());
    let mut l = 1u32.to_le_bytes().to_vec();
    l.extend_from_slice(&[0; 16]);
    l.extend_from_slice(&12345u32.to_le_bytes());
    assert!(Message::decode(FrameKind::Layout, &l).is_err());
}

fn batch_frame(round: u32, runs: &[BatchRun], data: &[u8]) -> Vec<u8> {
    let hashes: Vec<u64> = data.chunks(4096).map(crate::checksum::xxh3_64).collect();
    frame(round, runs, data, &hashes)
}

/// A Pages frame of `runs` with page `bytes` (uncompressed) and `hashes`.
fn frame(round: u32, runs: &[BatchRun], data: &[u8], hashes: &[u64]) -> Vec<u8> {
    flagged_frame(round, runs, data, hashes, 0)
}

/// A Pages frame with frame flags `flags`.
fn flagged_frame(round: u32, runs: &[BatchRun], data: &[u8], hashes: &[u64], flags: u8) -> Vec<u8> {
    let table = encode_batch_header(round, runs, data.len() as u32, data.len() as u32, hashes);
    let mut payload = table.clone();
    payload.extend_from_slice(data);
    let len = payload.len() as u32;
    let h = FrameHeader {
        kind: FrameKind::Pages,
        flags,
        len,
        check: crate::checksum::xxh3_64_with_seed(&table, check_seed(FrameKind::Pages, flags, len)),
    };
    let mut wire = h.to_bytes().to_vec();
    wire.extend_from_slice(&payload);
    wire
}

#[test]
fn batch_headers_are_validated_against_the_layout() {
    let l = layout();
    let ok = [
        BatchRun {
            region: 0,
            first: 60,
            count: 4,
            kind: RunKind::Data,
        },
        BatchRun {
            region: 1,
            first: 1,
            count: 1,
            kind: RunKind::Zero,
        },
    ];
    let wire = batch_frame(3, &ok, &vec![7u8; 4 * 4096]);
    let mut r = &wire[..];
    let h = read_frame_header(&mut r).unwrap();
    let bh = decode_batch_header(&mut r, &h, &l).unwrap();
    assert_eq!(bh.round, 3);
    assert_eq!(bh.page_hashes.len(), 4);
    assert_eq!(bh.runs, ok);
    assert_eq!(bh.raw_len, 4 * 4096);

    let cases: Vec<(Vec<BatchRun>, usize, &str)> = vec![
        (
            vec![BatchRun {
                region: 0,
                first: 61,
                count: 4,
                kind: RunKind::Data,
            }],
            4 * 4096,
            "past the region end",
        ),
        (
            vec![BatchRun {
                region: 2,
                first: 0,
                count: 1,
                kind: RunKind::Data,
            }],
            4096,
            "missing region",
        ),
        (
            vec![BatchRun {
                region: 0,
                first: 0,
                count: 0,
                kind: RunKind::Data,
            }],
            0,
            "empty run",
        ),
        (
            vec![BatchRun {
                region: 0,
                first: 0,
                count: 2,
                kind: RunKind::Data,
            }],
            4096,
            "bytes disagree with runs",
        ),
        (
            vec![BatchRun {
                region: 0,
                first: u64::MAX,
                count: 2,
                kind: RunKind::Zero,
            }],
            0,
            "overflowing page index",
        ),
    ];
    for (runs, bytes, what) in cases {
        let wire = batch_frame(0, &runs, &vec![1u8; bytes]);
        let mut r = &wire[..];
        let h = read_frame_header(&mut r).unwrap();
        assert!(
            matches!(
                decode_batch_header(&mut r, &h, &l),
                Err(ProtocolError::Malformed { .. })
            ),
            "{what} accepted"
        );
    }
    // A flipped bit anywhere in the table or hashes fails the frame check.
    let wire = batch_frame(3, &ok, &vec![7u8; 4 * 4096]);
    let table_end = HEADER_LEN + 16 + 2 * 24 + 4 * 8;
    for bit in (HEADER_LEN * 8..table_end * 8).step_by(7) {
        let mut bad = wire.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let mut r = &bad[..];
        let res = read_frame_header(&mut r).and_then(|h| decode_batch_header(&mut r, &h, &l));
        assert!(
            res.is_err(),
            "bit {bit} flipped in the batch table went unnoticed"
        );
    }
}

/// A batch flagged unhashed has no page hashes: it decodes without them,
/// and one that carries them anyway (or an unknown flag) is malformed.
#[test]
fn unhashed_batches_carry_no_page_hashes() {
    let l = layout();
    let runs = [BatchRun {
        region: 0,
        first: 2,
        count: 3,
        kind: RunKind::Data,
    }];
    let data = vec![9u8; 3 * 4096];
    let wire = flagged_frame(1, &runs, &data, &[], FLAG_UNHASHED);
    let mut r = &wire[..];
    let h = read_frame_header(&mut r).unwrap();
    let bh = decode_batch_header(&mut r, &h, &l).unwrap();
    assert!(bh.unhashed && bh.page_hashes.is_empty());
    assert_eq!((bh.runs.as_slice(), bh.raw_len), (&runs[..], 3 * 4096));
    assert_eq!(r, &data[..], "the page bytes are left on the stream");
    // A hashed frame is not unhashed.
    let wire = frame(1, &runs, &data, &[1, 2, 3]);
    let mut r = &wire[..];
    let h = read_frame_header(&mut r).unwrap();
    assert!(!decode_batch_header(&mut r, &h, &l).unwrap().unhashed);

    let hashes = [1, 2, 3];
    for (flags, hashes, what) in [
        (FLAG_UNHASHED, &hashes[..], "unhashed with hashes"),
        (0, &[][..], "hashed without hashes"),
        (4, &hashes[..], "unknown flag"),
    ] {
        let wire = flagged_frame(1, &runs, &data, hashes, flags);
        let mut r = &wire[..];
        let h = read_frame_header(&mut r).unwrap();
        assert!(
            matches!(
                decode_batch_header(&mut r, &h, &l),
                Err(ProtocolError::Malformed { .. })
            ),
            "{what} accepted"
        );
    }
}

/// A Sparse batch frame: `pages` full pages (for their hashes) travel as
/// their words after `data`.
fn sparse_frame(runs: &[BatchRun], data: &[u8], pages: &[Vec<u8>]) -> Vec<u8> {
    let mut hashes: Vec<u64> = data.chunks(4096).map(crate::checksum::xxh3_64).collect();
    let mut bytes = data.to_vec();
    for p in pages {
        let mut words = Vec::new();
        assert!(crate::memory::sparse_words(p, MAX_SPARSE_WORDS, &mut words));
        let at = bytes.len();
        encode_sparse_page(&words, &mut bytes);
        hashes.push(crate::checksum::xxh3_64(&bytes[at..]));
    }
    frame(0, runs, &bytes, &hashes)
}

#[test]
fn sparse_pages_round_trip_and_bad_encodings_are_refused() {
    // A page with three words set: 2 + 3 × 10 bytes, back to the same page.
    let mut page = vec![0u8; 4096];
    page[0] = 1;
    page[8 * 100 + 3] = 0xab;
    page[4088..].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut words = Vec::new();
    assert!(crate::memory::sparse_words(
        &page,
        MAX_SPARSE_WORDS,
        &mut words
    ));
    assert_eq!(words.len(), 3);
    let mut enc = Vec::new();
    encode_sparse_page(&words, &mut enc);
    assert_eq!(enc.len(), 32);
    let mut back = vec![(9, 9)];
    assert_eq!(decode_sparse_page(&enc, &mut back).unwrap(), 32);
    assert_eq!(back, words);
    // A dense page is not sparse; exactly MAX_SPARSE_WORDS words still are.
    let dense = vec![1u8; 4096];
    assert!(!crate::memory::sparse_words(
        &dense,
        MAX_SPARSE_WORDS,
        &mut Vec::new()
    ));
    let mut edge = vec![0u8; 4096];
    (0..MAX_SPARSE_WORDS).for_each(|i| edge[i * 16] = 1);
    assert!(crate::memory::sparse_words(
        &edge,
        MAX_SPARSE_WORDS,
        &mut Vec::new()
    ));
    edge[4095] = 1;
    assert!(!crate::memory::sparse_words(
        &edge,
        MAX_SPARSE_WORDS,
        &mut Vec::new()
    ));
    // The same limits with every word at the start of the page (where the
    // dense test counts before collecting).
    let mut head = vec![0u8; 4096];
    (0..MAX_SPARSE_WORDS).for_each(|i| head[i * 8 + 7] = 1);
    let mut words = Vec::new();
    assert!(crate::memory::sparse_words(
        &head,
        MAX_SPARSE_WORDS,
        &mut words
    ));
    assert_eq!(words.len(), MAX_SPARSE_WORDS);
    head[MAX_SPARSE_WORDS * 8] = 1;
    assert!(!crate::memory::sparse_words(
        &head,
        MAX_SPARSE_WORDS,
        &mut Vec::new()
    ));

    let entry = |i: u16, v: u64| [i.to_le_bytes().to_vec(), v.to_le_bytes().to_vec()].concat();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "empty"),
        (vec![1, 0], "truncated words"),
        (
            [vec![65, 0], entry(0, 1).repeat(65)].concat(),
            "too many words",
        ),
        (
            [vec![1, 0], entry(512, 1)].concat(),
            "word outside the page",
        ),
        (
            [vec![2, 0], entry(5, 1), entry(5, 2)].concat(),
            "words not ascending",
        ),
    ];
    for (bytes, what) in cases {
        assert!(
            matches!(
                decode_sparse_page(&bytes, &mut back),
                Err(ProtocolError::Malformed { .. })
            ),
            "{what} accepted"
        );
    }
}

#[test]
fn sparse_runs_are_validated() {
    let l = layout();
    let runs = [
        BatchRun {
            region: 0,
            first: 0,
            count: 1,
            kind: RunKind::Data,
        },
        BatchRun {
            region: 0,
            first: 1,
            count: 2,
            kind: RunKind::Sparse,
        },
    ];
    let mut p = vec![0u8; 4096];
    p[17] = 9;
    let wire = sparse_frame(&runs, &vec![3u8; 4096], &[p.clone(), p.clone()]);
    let mut r = &wire[..];
    let h = read_frame_header(&mut r).unwrap();
    let bh = decode_batch_header(&mut r, &h, &l).unwrap();
    assert_eq!(bh.page_hashes.len(), 3, "data and sparse pages are hashed");
    assert_eq!(bh.data_len, 4096);
    assert_eq!(bh.raw_len, 4096 + 2 * 12);

    // Sparse pages in a region of 2 MiB pages; fewer encoding bytes than
    // pages could hold.
    let huge = [BatchRun {
        region: 1,
        first: 0,
        count: 1,
        kind: RunKind::Sparse,
    }];
    let short = [BatchRun {
        region: 0,
        first: 0,
        count: 3,
        kind: RunKind::Sparse,
    }];
    for (runs, pages, what) in [
        (&huge[..], 1, "sparse huge page"),
        (&short[..], 2, "three sparse pages in the bytes of two"),
    ] {
        let wire = sparse_frame(runs, &[], &vec![vec![0u8; 4096]; pages]);
        let mut r = &wire[..];
        let h = read_frame_header(&mut r).unwrap();
        assert!(
            matches!(
                decode_batch_header(&mut r, &h, &l),
                Err(ProtocolError::Malformed { .. })
            ),
            "{what} accepted"
        );
    }
}
