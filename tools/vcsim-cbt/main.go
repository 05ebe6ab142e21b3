// Command vcsim-cbt is the vSphere simulator of blockrepl's tests: govmomi's
// simulator (the Debian package's, 0.24) plus what it lacks for a backup client,
// Changed Block Tracking.
//
// It starts the simulator on 127.0.0.1 over HTTPS with a fresh self-signed
// certificate, creates one VM with the disks asked for (their flat files sized
// to capacity, sparse, all zeros), prints one JSON line on stdout (URL,
// certificate thumbprint, the VM, each disk's flat file) and serves until its
// standard input closes or it gets SIGTERM/SIGINT.
//
// CBT emulation:
//   - When a snapshot of a VM with changeTrackingEnabled is created, every disk
//     gets a new changeId (in the VM's and in the snapshot's configuration), and
//     a hash of each 64 KiB block of the disk's flat file is recorded for it.
//   - QueryChangedDiskAreas(snapshot, deviceKey, startOffset, changeId) answers
//     from those hashes as of the snapshot: "*" gives the blocks that are not
//     all zeros, a changeId recorded earlier gives the blocks whose hash differs
//     between then and the snapshot, and anything else is an InvalidArgument
//     fault naming changeId. With -page-areas N an answer holds at most N areas
//     and covers only up to the end of the last one, so a client must page with
//     startOffset.
//
// A test changes a disk by writing into its flat file between snapshots. This
// is a contract test of a client, not a model of vCenter: real CBT tracks the
// guest's writes, at its own granularity.
//
// Built in GOPATH mode from Debian's packages (tools/vcsim-cbt/build).
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/xml"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// The granularity of the emulated change tracking.
const blockSize = 64 * 1024

type diskOut struct {
	Key      int32  `json:"key"`
	Label    string `json:"label"`
	File     string `json:"file"`
	Flat     string `json:"flat"`
	Capacity int64  `json:"capacity"`
}

type vmOut struct {
	Name  string `json:"name"`
	Path  string `json:"path"`
	UUID  string `json:"uuid"`
	Moref string `json:"moref"`
}

type output struct {
	URL        string    `json:"url"`
	Thumbprint string    `json:"thumbprint"`
	VM         vmOut     `json:"vm"`
	Disks      []diskOut `json:"disks"`
}

func main() {
	log.SetFlags(0)
	log.SetPrefix("vcsim-cbt: ")
	user := flag.String("user", "user", "the only user name that may log in")
	password := flag.String("password", "pass", "its password")
	vmName := flag.String("vm", "blockrepl-vm", "name of the VM to create")
	disks := flag.String("disks", "8M,4M", "capacities of the VM's disks (K, M or G suffix), comma-separated")
	cbtOn := flag.Bool("cbt", false, "create the VM with changeTrackingEnabled")
	pageAreas := flag.Int("page-areas", 0, "at most this many areas per QueryChangedDiskAreas answer (0: all)")
	snapshotDelay := flag.Duration("snapshot-delay", 0, "hold each CreateSnapshot_Task request this long (a slow snapshot)")
	flag.Parse()

	sizes, err := parseSizes(*disks)
	if err != nil {
		log.Fatalf("-disks: %v", err)
	}
	cert, thumbprint, err := selfSigned()
	if err != nil {
		log.Fatalf("certificate: %v", err)
	}

	model := simulator.VPX()
	if err := model.Create(); err != nil {
		log.Fatalf("model: %v", err)
	}
	defer model.Remove()

	cbt := newCBT(*pageAreas)
	cbt.snapshotDelay = *snapshotDelay
	simulator.Map.AddHandler(cbt)

	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword(*user, *password)}
	server := model.Service.NewServer()
	defer server.Close()
	// Nothing has connected yet: put the CBT front in before the first request.
	server.Config.Handler = cbt.front(server.Config.Handler)

	out, err := createVM(server.URL, *vmName, sizes, *cbtOn)
	if err != nil {
		log.Fatalf("creating the VM: %v", err)
	}
	u := *server.URL
	u.User = nil
	out.URL = u.String()
	out.Thumbprint = thumbprint
	line, err := json.Marshal(out)
	if err != nil {
		log.Fatalf("json: %v", err)
	}
	fmt.Println(string(line))

	done := make(chan struct{}, 2)
	go func() {
		_, _ = io.Copy(io.Discard, bufio.NewReader(os.Stdin))
		done <- struct{}{}
	}()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		done <- struct{}{}
	}()
	<-done
}

func parseSizes(s string) ([]int64, error) {
	var out []int64
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		mult := int64(1)
		switch {
		case strings.HasSuffix(part, "K"):
			mult, part = 1<<10, strings.TrimSuffix(part, "K")
		case strings.HasSuffix(part, "M"):
			mult, part = 1<<20, strings.TrimSuffix(part, "M")
		case strings.HasSuffix(part, "G"):
			mult, part = 1<<30, strings.TrimSuffix(part, "G")
		}
		n, err := strconv.ParseInt(part, 10, 64)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("%q is not a size", part)
		}
		if (n*mult)%1024 != 0 {
			return nil, fmt.Errorf("%q is not a whole number of KiB", part)
		}
		out = append(out, n*mult)
	}
	return out, nil
}

// selfSigned makes a fresh certificate for 127.0.0.1 and returns it with its
// SHA-256 thumbprint as vCenter shows it (upper-case hex pairs joined by ':').
func selfSigned() (tls.Certificate, string, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, "", err
	}
	template := x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "vcsim-cbt"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, &template, &template, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, "", err
	}
	sum := sha256.Sum256(der)
	hexes := make([]string, len(sum))
	for i, b := range sum {
		hexes[i] = fmt.Sprintf("%02X", b)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, strings.Join(hexes, ":"), nil
}

// createVM adds a VM with one thin disk per size to the first cluster, through
// the simulator's own API, and sizes the disks' flat files.
func createVM(u *url.URL, name string, sizes []int64, cbtOn bool) (output, error) {
	ctx := context.Background()
	var out output
	c, err := govmomi.NewClient(ctx, u, true)
	if err != nil {
		return out, err
	}
	defer func() { _ = c.Logout(ctx) }()
	finder := find.NewFinder(c.Client, true)
	dc, err := finder.DefaultDatacenter(ctx)
	if err != nil {
		return out, err
	}
	finder.SetDatacenter(dc)
	folders, err := dc.Folders(ctx)
	if err != nil {
		return out, err
	}
	pool, err := finder.ResourcePool(ctx, "DC0_C0/Resources")
	if err != nil {
		return out, err
	}
	ds, err := finder.Datastore(ctx, "LocalDS_0")
	if err != nil {
		return out, err
	}

	var devices object.VirtualDeviceList
	scsi, err := devices.CreateSCSIController("pvscsi")
	if err != nil {
		return out, err
	}
	devices = append(devices, scsi)
	for i, size := range sizes {
		file := fmt.Sprintf("[LocalDS_0] %s/%s.vmdk", name, name)
		if i > 0 {
			file = fmt.Sprintf("[LocalDS_0] %s/%s_%d.vmdk", name, name, i)
		}
		disk := devices.CreateDisk(scsi.(types.BaseVirtualController), ds.Reference(), file)
		disk.CapacityInKB = size / 1024
		disk.CapacityInBytes = size
		// Keys and labels as vCenter numbers them.
		disk.Key = int32(2000 + i)
		disk.DeviceInfo = &types.Description{Label: fmt.Sprintf("Hard disk %d", i+1), Summary: "disk"}
		devices = append(devices, disk)
	}
	config := types.VirtualMachineConfigSpec{
		Name:                  name,
		GuestId:               string(types.VirtualMachineGuestOsIdentifierOtherGuest),
		Files:                 &types.VirtualMachineFileInfo{VmPathName: "[LocalDS_0]"},
		ChangeTrackingEnabled: types.NewBool(cbtOn),
	}
	config.DeviceChange, err = devices.ConfigSpec(types.VirtualDeviceConfigSpecOperationAdd)
	if err != nil {
		return out, err
	}
	task, err := folders.VmFolder.CreateVM(ctx, config, pool, nil)
	if err != nil {
		return out, err
	}
	info, err := task.WaitForResult(ctx, nil)
	if err != nil {
		return out, err
	}
	ref := info.Result.(types.ManagedObjectReference)
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return out, fmt.Errorf("created VM %s is not in the registry", ref)
	}
	out.VM = vmOut{
		Name:  name,
		Path:  fmt.Sprintf("%s/vm/%s", dc.InventoryPath, name),
		UUID:  vm.Config.InstanceUuid,
		Moref: ref.Value,
	}
	for _, d := range vm.Config.Hardware.Device {
		disk, backing, ok := flatDisk(d)
		if !ok {
			continue
		}
		flat, err := flatPath(backing)
		if err != nil {
			return out, err
		}
		capacity := diskCapacity(disk)
		if err := os.Truncate(flat, capacity); err != nil {
			return out, err
		}
		out.Disks = append(out.Disks, diskOut{
			Key:      disk.Key,
			Label:    disk.DeviceInfo.GetDescription().Label,
			File:     backing.FileName,
			Flat:     flat,
			Capacity: capacity,
		})
	}
	return out, nil
}

func diskCapacity(disk *types.VirtualDisk) int64 {
	if disk.CapacityInBytes > 0 {
		return disk.CapacityInBytes
	}
	return disk.CapacityInKB * 1024
}

// flatDisk is d as a disk backed by a flat file, if it is one.
func flatDisk(d types.BaseVirtualDevice) (*types.VirtualDisk, *types.VirtualDiskFlatVer2BackingInfo, bool) {
	disk, ok := d.(*types.VirtualDisk)
	if !ok {
		return nil, nil, false
	}
	backing, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	return disk, backing, ok
}

// flatPath is the local file behind a disk: "[ds] dir/name.vmdk" is
// <datastore directory>/dir/name-flat.vmdk.
func flatPath(backing *types.VirtualDiskFlatVer2BackingInfo) (string, error) {
	var p object.DatastorePath
	if !p.FromString(backing.FileName) || backing.Datastore == nil {
		return "", fmt.Errorf("disk file %q has no datastore", backing.FileName)
	}
	ds, ok := simulator.Map.Get(*backing.Datastore).(*simulator.Datastore)
	if !ok {
		return "", fmt.Errorf("datastore %s of %q not found", backing.Datastore, backing.FileName)
	}
	dir := ds.Info.GetDatastoreInfo().Url
	return filepath.Join(dir, strings.TrimSuffix(p.Path, ".vmdk")+"-flat.vmdk"), nil
}

// blocks is a disk's content as CBT sees it: a hash per block, and whether the
// block is all zeros.
type blocks struct {
	capacity int64
	sums     [][sha256.Size]byte
	zero     []bool
}

func readBlocks(path string, capacity int64) (*blocks, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	n := (capacity + blockSize - 1) / blockSize
	b := &blocks{capacity: capacity, sums: make([][sha256.Size]byte, n), zero: make([]bool, n)}
	buf := make([]byte, blockSize)
	zeros := make([]byte, blockSize)
	for i := int64(0); i < n; i++ {
		for j := range buf {
			buf[j] = 0
		}
		// A short file reads as zeros past its end, like a thin disk.
		if _, err := f.ReadAt(buf, i*blockSize); err != nil && err != io.EOF {
			return nil, err
		}
		b.sums[i] = sha256.Sum256(buf)
		b.zero[i] = bytes.Equal(buf, zeros)
	}
	return b, nil
}

type stateKey struct {
	vm       string
	device   int32
	changeID string
}

// cbt holds the emulated change tracking. It is a simulator.RegisterObject, so
// the simulator calls PutObject for every object it creates (snapshots too),
// inside the call that creates it and with the VM locked.
type cbt struct {
	pageAreas     int
	snapshotDelay time.Duration

	mu        sync.Mutex
	seq       int
	diskUUIDs map[string]string                                             // "vm/deviceKey" -> uuid part of the changeIds
	states    map[stateKey]*blocks                                          // disk content at each changeId
	snapshots map[types.ManagedObjectReference]map[int32]string             // snapshot -> deviceKey -> changeId
	snapVM    map[types.ManagedObjectReference]types.ManagedObjectReference // snapshot -> VM
}

func newCBT(pageAreas int) *cbt {
	return &cbt{
		pageAreas: pageAreas,
		diskUUIDs: map[string]string{},
		states:    map[stateKey]*blocks{},
		snapshots: map[types.ManagedObjectReference]map[int32]string{},
		snapVM:    map[types.ManagedObjectReference]types.ManagedObjectReference{},
	}
}

func (c *cbt) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "BlockreplCBT", Value: "cbt"}
}

func (c *cbt) UpdateObject(mo.Reference, []types.PropertyChange) {}

// RemoveObject forgets a removed snapshot; the changeIds it made stay valid, as
// they do in vSphere.
func (c *cbt) RemoveObject(ref types.ManagedObjectReference) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.snapshots, ref)
	delete(c.snapVM, ref)
}

func (c *cbt) diskUUID(vm string, key int32) string {
	k := fmt.Sprintf("%s/%d", vm, key)
	if id, ok := c.diskUUIDs[k]; ok {
		return id
	}
	raw := make([]byte, 16)
	_, _ = rand.Read(raw)
	parts := make([]string, 16)
	for i, b := range raw {
		parts[i] = fmt.Sprintf("%02x", b)
	}
	id := strings.Join(parts[:8], " ") + "-" + strings.Join(parts[8:], " ")
	c.diskUUIDs[k] = id
	return id
}

// PutObject gives the disks of a new snapshot new changeIds and records their
// content, when the VM tracks changes.
func (c *cbt) PutObject(obj mo.Reference) {
	snap, ok := obj.(*simulator.VirtualMachineSnapshot)
	if !ok {
		return
	}
	vm, ok := simulator.Map.Get(snap.Vm).(*simulator.VirtualMachine)
	if !ok || vm.Config == nil {
		return
	}
	if vm.Config.ChangeTrackingEnabled == nil || !*vm.Config.ChangeTrackingEnabled {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seq++
	ids := map[int32]string{}
	// The simulator's snapshot shares the VM's device objects: give it copies of
	// the disks, so that the snapshot keeps its changeIds when the VM moves on.
	devices := make([]types.BaseVirtualDevice, len(snap.Config.Hardware.Device))
	for i, d := range snap.Config.Hardware.Device {
		devices[i] = d
		disk, backing, ok := flatDisk(d)
		if !ok {
			continue
		}
		flat, err := flatPath(backing)
		if err != nil {
			log.Printf("snapshot %s: %v", snap.Self, err)
			continue
		}
		content, err := readBlocks(flat, diskCapacity(disk))
		if err != nil {
			log.Printf("snapshot %s: reading %s: %v", snap.Self, flat, err)
			continue
		}
		id := fmt.Sprintf("%s/%d", c.diskUUID(vm.Self.Value, disk.Key), c.seq)
		c.states[stateKey{vm.Self.Value, disk.Key, id}] = content
		ids[disk.Key] = id

		snapDisk := *disk
		snapBacking := *backing
		snapBacking.ChangeId = id
		snapDisk.Backing = &snapBacking
		devices[i] = &snapDisk
		backing.ChangeId = id
	}
	snap.Config.Hardware.Device = devices
	c.snapshots[snap.Self] = ids
	c.snapVM[snap.Self] = snap.Vm
}

// The simulator's SOAP endpoint answers this probe only for a logged-in session.
const sessionProbe = `<?xml version="1.0" encoding="UTF-8"?>` +
	`<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>` +
	`<CurrentTime xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this></CurrentTime>` +
	`</soapenv:Body></soapenv:Envelope>`

// front answers QueryChangedDiskAreas itself and passes everything else to the
// simulator (holding CreateSnapshot_Task for -snapshot-delay first).
func (c *cbt) front(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || !strings.HasPrefix(r.URL.Path, "/sdk") {
			next.ServeHTTP(w, r)
			return
		}
		body, err := io.ReadAll(r.Body)
		_ = r.Body.Close()
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		if c.snapshotDelay > 0 && bytes.Contains(body, []byte("CreateSnapshot_Task")) {
			time.Sleep(c.snapshotDelay)
		}
		if !bytes.Contains(body, []byte("QueryChangedDiskAreas")) {
			r.Body = io.NopCloser(bytes.NewReader(body))
			next.ServeHTTP(w, r)
			return
		}
		method, err := simulator.UnmarshalBody(types.TypeFunc(), body)
		if err != nil || method.Name != "QueryChangedDiskAreas" {
			r.Body = io.NopCloser(bytes.NewReader(body))
			next.ServeHTTP(w, r)
			return
		}
		probe := httptest.NewRequest(http.MethodPost, r.URL.Path, strings.NewReader(sessionProbe))
		probe.Header = r.Header.Clone()
		probe.Header.Del("Content-Length")
		rec := httptest.NewRecorder()
		next.ServeHTTP(rec, probe)
		if rec.Code != http.StatusOK {
			// Not logged in: the simulator's own NotAuthenticated fault.
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.WriteHeader(rec.Code)
			_, _ = w.Write(rec.Body.Bytes())
			return
		}
		req := method.Body.(*types.QueryChangedDiskAreas)
		info, fault := c.query(req)
		w.Header().Set("Content-Type", "text/xml; charset=utf-8")
		if fault != nil {
			w.WriteHeader(http.StatusInternalServerError)
			_, _ = w.Write(fault)
			return
		}
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(info)
	})
}

func (c *cbt) query(req *types.QueryChangedDiskAreas) ([]byte, []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if req.Snapshot == nil {
		return nil, invalidArgument("snapshot")
	}
	ids, ok := c.snapshots[*req.Snapshot]
	if !ok || c.snapVM[*req.Snapshot] != req.This {
		if _, isVM := simulator.Map.Get(req.This).(*simulator.VirtualMachine); !isVM {
			return nil, fault("ManagedObjectNotFound", "The object has already been deleted or has not been completely created", "")
		}
		if simulator.Map.Get(*req.Snapshot) == nil {
			return nil, fault("ManagedObjectNotFound", "The object has already been deleted or has not been completely created", "")
		}
		return nil, fault("FileFault", "Change tracking is not active on the disks of this snapshot", "")
	}
	id, ok := ids[req.DeviceKey]
	if !ok {
		return nil, invalidArgument("deviceKey")
	}
	now := c.states[stateKey{req.This.Value, req.DeviceKey, id}]
	if req.StartOffset < 0 || req.StartOffset >= now.capacity {
		return nil, invalidArgument("startOffset")
	}
	changed := func(i int) bool { return !now.zero[i] }
	if req.ChangeId != "*" {
		then, ok := c.states[stateKey{req.This.Value, req.DeviceKey, req.ChangeId}]
		if !ok || then.capacity != now.capacity {
			return nil, invalidArgument("changeId")
		}
		changed = func(i int) bool { return then.sums[i] != now.sums[i] }
	}

	info := types.DiskChangeInfo{StartOffset: req.StartOffset, Length: now.capacity - req.StartOffset}
	first := int(req.StartOffset / blockSize)
	for i := first; i < len(now.sums); i++ {
		if !changed(i) {
			continue
		}
		start := int64(i) * blockSize
		if start < req.StartOffset {
			start = req.StartOffset
		}
		end := int64(i+1) * blockSize
		if end > now.capacity {
			end = now.capacity
		}
		n := len(info.ChangedArea)
		if n > 0 && info.ChangedArea[n-1].Start+info.ChangedArea[n-1].Length == start {
			info.ChangedArea[n-1].Length = end - info.ChangedArea[n-1].Start
			continue
		}
		if c.pageAreas > 0 && n == c.pageAreas {
			last := info.ChangedArea[n-1]
			info.Length = last.Start + last.Length - req.StartOffset
			break
		}
		info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: start, Length: end - start})
	}
	var b bytes.Buffer
	b.WriteString(xml.Header)
	b.WriteString(`<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" ` +
		`xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">` +
		`<soapenv:Body><QueryChangedDiskAreasResponse xmlns="urn:vim25"><returnval>`)
	fmt.Fprintf(&b, "<startOffset>%d</startOffset><length>%d</length>", info.StartOffset, info.Length)
	for _, a := range info.ChangedArea {
		fmt.Fprintf(&b, "<changedArea><start>%d</start><length>%d</length></changedArea>", a.Start, a.Length)
	}
	b.WriteString(`</returnval></QueryChangedDiskAreasResponse></soapenv:Body></soapenv:Envelope>`)
	return b.Bytes(), nil
}

func invalidArgument(property string) []byte {
	return fault("InvalidArgument", "A specified parameter was not correct: "+property,
		"<invalidProperty>"+property+"</invalidProperty>")
}

// fault is a SOAP fault as vCenter writes one.
func fault(kind, message, detail string) []byte {
	var esc bytes.Buffer
	_ = xml.EscapeText(&esc, []byte(message))
	return []byte(xml.Header +
		`<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" ` +
		`xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">` +
		`<soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>` + esc.String() +
		`</faultstring><detail><` + kind + `Fault xmlns="urn:vim25" xsi:type="` + kind + `">` + detail +
		`</` + kind + `Fault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>`)
}
